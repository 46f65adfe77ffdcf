"""Image folders: decoding real PNG/JPEG files, resize, colour modes, split, cache, bad input."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import zsgd.data.imagefolder as imagefolder
from zsgd.data import load_dataset, load_imagefolder
from zsgd.errors import ZsgdError


pytestmark = pytest.mark.usefixtures("isolated_data")


def make_folder(root: Path, per_class: int = 5) -> Path:
    """Three classes of differently sized images: RGB PNG, JPEG, grayscale PNG, RGBA PNG."""
    rng = np.random.default_rng(0)
    colours = {"airplanes": (200, 30, 30), "faces": (30, 200, 30), "motorbikes": (30, 30, 200)}
    for cls, colour in colours.items():
        d = root / cls
        d.mkdir(parents=True)
        for i in range(per_class):
            h, w = int(rng.integers(20, 60)), int(rng.integers(20, 60))
            pixels = np.clip(np.array(colour) + rng.integers(-20, 20, (h, w, 3)), 0, 255).astype(np.uint8)
            img = Image.fromarray(pixels, "RGB")
            kind = i % 4
            if kind == 0:
                img.save(d / f"image_{i:04d}.png")
            elif kind == 1:
                img.save(d / f"image_{i:04d}.jpg", quality=90)
            elif kind == 2:
                img.convert("L").save(d / f"image_{i:04d}.png")
            else:
                img.convert("RGBA").save(d / f"image_{i:04d}.PNG")
    (root / "README.txt").write_text("not a class")
    (root / "faces" / "notes.txt").write_text("not an image")
    return root


def test_rgb_resize_and_stratified_split(tmp_path):
    root = make_folder(tmp_path / "101_ObjectCategories")
    ds = load_imagefolder(root, image_size=16)
    assert ds.name == f"imagefolder:{root.resolve()}"
    assert ds.classes == ["airplanes", "faces", "motorbikes"]
    assert ds.x_train.shape[1:] == (3, 16, 16) and ds.x_train.dtype == np.uint8
    assert len(ds.y_train) + len(ds.y_test) == 15
    assert ds.class_counts("train").tolist() == [4, 4, 4] and ds.class_counts("test").tolist() == [1, 1, 1]
    assert ds.y_train.dtype == np.int64 and ds.skipped == []
    # The dominant colour channel follows the class, so decoding kept colour.
    train_means = ds.x_train.astype(float).mean(axis=(2, 3))
    for label in range(3):
        rgb = train_means[ds.y_train == label]
        colour_imgs = rgb[np.ptp(rgb, axis=1) > 50]  # grayscale-saved images have equal channels
        assert (colour_imgs.argmax(axis=1) == label).all()


def test_grayscale_and_via_load_dataset(tmp_path):
    root = make_folder(tmp_path / "cats")
    ds = load_dataset(f"imagefolder:{root}", image_size=12, grayscale=True)
    assert ds.x_train.shape[1:] == (1, 12, 12) and ds.input_shape == (1, 12, 12)
    ds2 = load_dataset("imagefolder", data_dir=str(root), image_size=12, grayscale=True)
    np.testing.assert_array_equal(ds.x_train, ds2.x_train)


def test_second_load_hits_cache_and_changes_invalidate(tmp_path, monkeypatch):
    root = make_folder(tmp_path / "f")
    first = load_imagefolder(root, image_size=16)
    cache_files = list(imagefolder.imagefolder_cache_dir().glob("*.npz"))
    assert len(cache_files) == 1

    def no_decoding(*args, **kwargs):
        raise AssertionError("should have been served from the cache")

    real_build = imagefolder._build
    monkeypatch.setattr(imagefolder, "_build", no_decoding)
    second = load_imagefolder(root, image_size=16)
    np.testing.assert_array_equal(first.x_train, second.x_train)
    np.testing.assert_array_equal(first.y_test, second.y_test)
    assert "cached" in second.source

    # Another size or mode, or a touched file, is a different key.
    with pytest.raises(AssertionError):
        load_imagefolder(root, image_size=20)
    some = root / "faces" / "image_0000.png"
    st = some.stat()
    os.utime(some, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    with pytest.raises(AssertionError):
        load_imagefolder(root, image_size=16)
    monkeypatch.setattr(imagefolder, "_build", real_build)
    load_imagefolder(root, image_size=16)
    assert len(list(imagefolder.imagefolder_cache_dir().glob("*.npz"))) == 2


def test_damaged_cache_is_rebuilt(tmp_path):
    root = make_folder(tmp_path / "f")
    first = load_imagefolder(root, image_size=16)
    (cache,) = imagefolder.imagefolder_cache_dir().glob("*.npz")
    cache.write_bytes(b"garbage")
    again = load_imagefolder(root, image_size=16)
    np.testing.assert_array_equal(first.x_train, again.x_train)


def test_corrupt_image_is_skipped_and_reported(tmp_path, caplog):
    root = make_folder(tmp_path / "f")
    (root / "faces" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    ds = load_imagefolder(root, image_size=16)
    assert ds.skipped == ["faces/broken.jpg"]
    assert len(ds.y_train) + len(ds.y_test) == 15
    assert "skipped 1 unreadable image" in caplog.text


def test_split_is_deterministic(tmp_path):
    root = make_folder(tmp_path / "f", per_class=10)
    a = load_imagefolder(root, image_size=8, use_cache=False)
    b = load_imagefolder(root, image_size=8, use_cache=False)
    np.testing.assert_array_equal(a.x_test, b.x_test)
    assert a.class_counts("test").tolist() == [2, 2, 2]


def test_empty_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ZsgdError, match="empty holds no images in class subfolders"):
        load_imagefolder(tmp_path / "empty")


def test_one_class_is_an_error(tmp_path):
    root = make_folder(tmp_path / "f")
    for cls in ("faces", "motorbikes"):
        for p in (root / cls).iterdir():
            p.unlink()
    with pytest.raises(ZsgdError, match="only one class folder \\(airplanes\\)"):
        load_imagefolder(root)


def test_all_unreadable_in_one_of_two_classes(tmp_path):
    root = tmp_path / "f"
    (root / "a").mkdir(parents=True)
    (root / "b").mkdir()
    Image.new("RGB", (10, 10)).save(root / "a" / "x.png")
    (root / "b" / "y.png").write_bytes(b"nope")
    with pytest.raises(ZsgdError, match="readable images in 1 class folder"):
        load_imagefolder(root, image_size=8)


def test_missing_folder_and_bad_size(tmp_path):
    with pytest.raises(ZsgdError, match="does not exist"):
        load_imagefolder(tmp_path / "nowhere")
    with pytest.raises(ZsgdError, match="image size 2"):
        load_imagefolder(make_folder(tmp_path / "f"), image_size=2)
