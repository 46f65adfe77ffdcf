"""Data sets by name: lookup order, the embedded subset, and errors a user can cause."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import zsgd.data.datasets as datasets
from zsgd.data import Dataset, load_dataset, to_float
from zsgd.data.cache import data_home, zsgd_home
from zsgd.data.embedded import EMBEDDED_PATH, EMBEDDED_SOURCE, read_embedded_arrays
from zsgd.data.idx import read_idx, write_idx
from zsgd.errors import ZsgdError

ROOT = Path(__file__).resolve().parent.parent
SYSTEM = Path("/usr/share/datasets/fashion-mnist")
NAMES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


pytestmark = pytest.mark.usefixtures("isolated_data")


def fake_idx_dir(directory: Path, n_train=30, n_test=10, gz=True, seed=0, dotted=False) -> Path:
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    arrays = [
        rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        (np.arange(n_train) % 10).astype(np.uint8),
        rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        (np.arange(n_test) % 10).astype(np.uint8),
    ]
    for base, arr in zip(NAMES, arrays):
        name = base.replace("-idx", ".idx") if dotted else base
        write_idx(directory / (name + (".gz" if gz else "")), arr, compress=gz)
    return directory


def test_cache_dir_honours_env(monkeypatch, tmp_path):
    monkeypatch.setenv("ZSGD_HOME", str(tmp_path / "h"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert zsgd_home() == tmp_path / "h"
    monkeypatch.delenv("ZSGD_HOME")
    assert zsgd_home() == tmp_path / "xdg" / "zsgd"
    assert data_home() == tmp_path / "xdg" / "zsgd" / "data"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert zsgd_home() == tmp_path / "home" / ".cache" / "zsgd"


def test_embedded_shape_stratification_and_size():
    ds = load_dataset("embedded")
    assert ds.name == "embedded" and ds.source == EMBEDDED_SOURCE
    assert ds.x_train.shape == (10_000, 1, 28, 28) and ds.x_test.shape == (2_000, 1, 28, 28)
    assert ds.x_train.dtype == np.uint8 and ds.y_train.dtype == np.int64 and ds.y_test.dtype == np.int64
    assert ds.input_shape == (1, 28, 28) and ds.n_classes == 10
    assert ds.class_counts("train").tolist() == [1000] * 10
    assert ds.class_counts("test").tolist() == [200] * 10
    assert EMBEDDED_PATH.stat().st_size <= 6_000_000
    assert ds.classes[0] == "T-shirt/top" and ds.classes[9] == "Ankle boot"
    assert ds.x_train.std() > 30  # real pictures, not zeros


def test_embedded_file_has_no_pickles():
    with np.load(EMBEDDED_PATH, allow_pickle=False) as store:
        for name in store.files:
            assert not store[name].dtype.hasobject


def test_embedded_decode_is_cached_by_content_and_a_bad_cache_is_ignored(tmp_path, monkeypatch):
    monkeypatch.setenv("ZSGD_HOME", str(tmp_path / "h"))
    decoded = read_embedded_arrays()  # decoded, and written to the cache
    (cached,) = (tmp_path / "h" / "data" / "embedded").glob("*.npz")
    again = read_embedded_arrays()  # read from it
    assert again.keys() == decoded.keys()
    for name in decoded:
        np.testing.assert_array_equal(again[name], decoded[name])
        assert again[name].dtype == decoded[name].dtype
    cached.write_bytes(cached.read_bytes()[:1000])  # damaged: decoded again and rewritten
    np.testing.assert_array_equal(read_embedded_arrays()["x_test"], decoded["x_test"])
    assert cached.stat().st_size > 1000
    other = tmp_path / "other.npz"  # another file's content has another key: never served this cache
    small = {"x_train": np.ones((2, 1, 2, 2), np.uint8), "y_train": np.arange(2), "x_test": np.zeros((1, 1, 2, 2), np.uint8),
             "y_test": np.arange(1)}
    np.savez(other, **small)
    assert read_embedded_arrays(other)["x_train"].shape == (2, 1, 2, 2)
    assert len(list((tmp_path / "h" / "data" / "embedded").glob("*.npz"))) == 2


@pytest.mark.skipif(not SYSTEM.is_dir(), reason="Debian dataset-fashion-mnist not installed")
def test_embedded_matches_its_recorded_source_indices():
    arrays = read_embedded_arrays()
    full_x = read_idx(SYSTEM / "t10k-images-idx3-ubyte.gz")
    full_y = read_idx(SYSTEM / "t10k-labels-idx1-ubyte.gz")
    idx = arrays["test_indices"].astype(np.int64)
    assert len(np.unique(idx)) == len(idx) == 2000
    np.testing.assert_array_equal(arrays["x_test"][:, 0], full_x[idx])
    np.testing.assert_array_equal(arrays["y_test"], full_y[idx])


@pytest.mark.slow
@pytest.mark.skipif(not SYSTEM.is_dir(), reason="Debian dataset-fashion-mnist not installed")
def test_make_embedded_is_reproducible():
    """The build script re-derives the shipped file byte for byte: the same draw from the source, the same
    xz entries, the same zip container. The two image arrays keep their shipped xz payloads (compressing
    them at the extreme preset takes ten seconds) once their decoded contents are shown equal; every other
    entry is compressed again."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_embedded", ROOT / "scripts" / "make_embedded.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    meta, subset, provenance = script.select(SYSTEM, script.SEED)
    shipped = read_embedded_arrays()
    for name, array in {**meta, **subset, **provenance}.items():
        np.testing.assert_array_equal(array, shipped[name], err_msg=name)
    store = np.load(EMBEDDED_PATH)

    def encode(name: str, array: np.ndarray) -> dict[str, np.ndarray]:
        if name in ("x_train", "x_test"):
            return {k: np.array(store[k]) for k in (f"{name}.xz", f"{name}.shape", f"{name}.dtype")}
        return script.encode_xz(name, array)

    assert script.xz_archive(meta, {**subset, **provenance}, encode) == EMBEDDED_PATH.read_bytes()


def test_default_falls_back_to_embedded():
    ds = load_dataset()
    assert ds.name == "embedded" and "embedded" in ds.source


def test_default_prefers_full_fashion_mnist_from_system_dir(tmp_path, monkeypatch):
    system = fake_idx_dir(tmp_path / "sys")
    monkeypatch.setattr(datasets, "SYSTEM_FASHION_MNIST_DIR", system)
    ds = load_dataset("default")
    assert ds.name == "fashion-mnist" and ds.source == str(system)
    assert ds.x_train.shape == (30, 1, 28, 28) and ds.x_test.shape == (10, 1, 28, 28)


def test_cache_wins_over_system_dir(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets, "SYSTEM_FASHION_MNIST_DIR", fake_idx_dir(tmp_path / "sys"))
    cached = fake_idx_dir(data_home() / "fashion-mnist", n_train=20)
    ds = load_dataset("fashion-mnist")
    assert ds.source == str(cached) and len(ds.y_train) == 20


def test_data_dir_accepts_uncompressed_and_dotted_names(tmp_path):
    ds = load_dataset("fashion-mnist", data_dir=str(fake_idx_dir(tmp_path / "raw", gz=False)))
    assert ds.x_train.shape == (30, 1, 28, 28)
    ds = load_dataset("mnist", data_dir=str(fake_idx_dir(tmp_path / "dotted", dotted=True)))
    assert ds.name == "mnist" and ds.classes == [str(d) for d in range(10)]


def test_data_dir_with_missing_files(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ZsgdError, match=r"empty lacks train-images-idx3-ubyte\[\.gz\].*zsgd data download"):
        load_dataset("fashion-mnist", data_dir=str(tmp_path / "empty"))


def test_mnist_missing_tells_user_to_download():
    with pytest.raises(ZsgdError, match="zsgd data download mnist.*--data-dir"):
        load_dataset("mnist")


def test_fashion_mnist_missing_mentions_embedded():
    with pytest.raises(ZsgdError, match="zsgd data download fashion-mnist.*embedded"):
        load_dataset("fashion-mnist")


def test_mismatched_counts_and_labels(tmp_path):
    d = fake_idx_dir(tmp_path / "bad")
    write_idx(d / "train-labels-idx1-ubyte.gz", np.zeros(29, dtype=np.uint8))
    with pytest.raises(ZsgdError, match="30 images but .*29 labels"):
        load_dataset("mnist", data_dir=str(d))
    write_idx(d / "train-labels-idx1-ubyte.gz", np.full(30, 12, dtype=np.uint8))
    with pytest.raises(ZsgdError, match="label 12"):
        load_dataset("mnist", data_dir=str(d))


def test_unknown_name():
    with pytest.raises(ZsgdError, match="unknown data set 'cifar10'.*imagefolder:PATH"):
        load_dataset("cifar10")
    with pytest.raises(ZsgdError, match="needs a folder"):
        load_dataset("imagefolder")


@pytest.mark.skipif(not SYSTEM.is_dir(), reason="Debian dataset-fashion-mnist not installed")
def test_fashion_mnist_from_debian_package(monkeypatch):
    monkeypatch.setattr(datasets, "SYSTEM_FASHION_MNIST_DIR", SYSTEM)
    ds = load_dataset("fashion-mnist")
    assert ds.source == str(SYSTEM)
    assert ds.x_train.shape == (60_000, 1, 28, 28) and ds.x_test.shape == (10_000, 1, 28, 28)
    assert ds.class_counts("train").tolist() == [6000] * 10
    assert ds.class_counts("test").tolist() == [1000] * 10
    assert load_dataset("default").name == "fashion-mnist"


def test_to_float():
    x = np.array([[0, 128, 255]], dtype=np.uint8)
    y = to_float(x)
    assert y.dtype == np.float32 and y.shape == x.shape
    assert y[0, 0] == 0.0 and y[0, 2] == 1.0 and abs(y[0, 1] - 128 / 255) < 1e-7
    with pytest.raises(TypeError):
        to_float(y)


def test_dataset_properties():
    ds = Dataset("t", "here", np.zeros((4, 3, 5, 6), np.uint8), np.array([0, 1, 1, 2]),
                 np.zeros((1, 3, 5, 6), np.uint8), np.array([2]), ["a", "b", "c"])
    assert ds.input_shape == (3, 5, 6) and ds.n_classes == 3
    assert ds.class_counts().tolist() == [1, 2, 1] and ds.class_counts("test").tolist() == [0, 0, 1]


def test_idx_files_are_decoded_once_then_read_from_the_cache(tmp_path, monkeypatch):
    """Every process of a run loads the IDX files: the second load reads the decoded cache, and a file
    whose bytes changed (same size, same directory) is decoded again, never served stale."""
    monkeypatch.setenv("ZSGD_HOME", str(tmp_path / "home"))
    d = fake_idx_dir(tmp_path / "fm", seed=1)
    first = datasets.load_idx_dataset("fashion-mnist", d)
    assert len(list((data_home() / "idx").glob("*.npz"))) == 1
    decoded = []
    import zsgd.data.idx as idx

    monkeypatch.setattr(idx, "read_idx", lambda *a, **k: decoded.append(a) or read_idx(*a, **k))
    again = datasets.load_idx_dataset("fashion-mnist", d)
    assert decoded == []
    for a, b in ((first.x_train, again.x_train), (first.y_test, again.y_test)):
        np.testing.assert_array_equal(a, b)
    fake_idx_dir(d, seed=2)  # new pixels and labels, the same sizes
    changed = datasets.load_idx_dataset("fashion-mnist", d)
    assert len(decoded) == 4
    assert not np.array_equal(changed.x_train, first.x_train)
    np.testing.assert_array_equal(changed.x_train, read_idx(next(d.glob("train-images*")))[:, None])


def test_a_settled_idx_set_is_decoded_once_per_process_and_a_fresh_one_is_not_kept(tmp_path, monkeypatch):
    """A run's forked workers get the arrays the run process decoded (no hash, no read); files changed
    within the last two seconds are not kept (a rewrite within one timestamp tick would keep their stat)."""
    monkeypatch.setenv("ZSGD_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(datasets, "_LOADED", {})
    d = fake_idx_dir(tmp_path / "fm", seed=1)
    reads = []
    real = datasets._decode_idx_files
    monkeypatch.setattr(datasets, "_decode_idx_files", lambda found, key: reads.append(1) or real(found, key))
    datasets.load_idx_dataset("fashion-mnist", d)
    datasets.load_idx_dataset("fashion-mnist", d)
    assert len(reads) == 2 and datasets._LOADED == {}  # just written: read each time
    monkeypatch.setattr(datasets, "SETTLED_NS", 0)
    first = datasets.load_idx_dataset("fashion-mnist", d)
    again = datasets.load_idx_dataset("fashion-mnist", d)
    assert len(reads) == 3 and np.shares_memory(first.x_train, again.x_train)
    # settled files are hashed once per machine: their stat names the decoded cache from then on
    (index,) = (data_home() / "idx" / "by-stat").iterdir()
    (cached,) = (data_home() / "idx").glob("*.npz")
    assert index.read_text() == cached.stem
    index.write_text("0" * 24)  # names a cache that is not there: the next process decodes again instead of hashing
    monkeypatch.setattr(datasets, "_LOADED", {})
    decoded = []
    import zsgd.data.idx as idx

    monkeypatch.setattr(idx, "read_idx", lambda *a, **k: decoded.append(a) or read_idx(*a, **k))
    datasets.load_idx_dataset("fashion-mnist", d)
    assert len(decoded) == 4
    fake_idx_dir(d, seed=2, n_train=31)  # changed files: a new stat, decoded again
    changed = datasets.load_idx_dataset("fashion-mnist", d)
    assert len(reads) == 5 and len(changed.y_train) == 31 and len(datasets._LOADED) == 1
