"""Image folders (one subfolder per class, Caltech101's ``101_ObjectCategories`` layout).

Decoding and resizing thousands of JPEGs takes tens of seconds, and every
worker process needs the same arrays, so the result is cached as an ``.npz``
in the zsgd cache under a hash of everything that determines it: the folder,
each file's name, size and modification time, the image size, the colour
mode, and the split. Touch, add or remove one image and the key changes, so a
stale cache is never read; a second load (or a second worker) is a file read.

The train/test split is stratified and seeded, so every process that loads
the folder gets the same split without talking to the others. Files that
cannot be decoded are skipped and listed in ``Dataset.skipped`` (a real
Caltech101 download holds a few odd files); that is not fatal. Caltech101's
``BACKGROUND_Google`` clutter folder is not an object class and is ignored, as
torchvision does.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from zsgd.data.cache import data_home, read_array_cache, write_array_cache
from zsgd.errors import ZsgdError

if TYPE_CHECKING:
    from zsgd.data.arrays import Dataset

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"})
IGNORED_FOLDERS = frozenset({"BACKGROUND_Google"})
CACHE_FORMAT = 1
DEFAULT_TEST_FRACTION = 0.2
DEFAULT_SEED = 0


def list_image_folder(root: Path) -> tuple[list[str], list[tuple[str, int]]]:
    """Class names (sorted subfolder names) and ``(relative path, class index)`` per image file."""
    classes: list[str] = []
    files: list[tuple[str, int]] = []
    for entry in sorted(root.iterdir(), key=lambda p: p.name):
        if not entry.is_dir() or entry.name.startswith(".") or entry.name in IGNORED_FOLDERS:
            continue
        images = sorted(
            p.name for p in entry.iterdir()
            if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS
        )
        if not images:
            continue
        label = len(classes)
        classes.append(entry.name)
        files.extend((f"{entry.name}/{name}", label) for name in images)
    return classes, files


def cache_key(root: Path, files: list[tuple[str, int]], image_size: int, grayscale: bool,
              seed: int, test_fraction: float) -> str:
    """Hash of everything the decoded arrays depend on (see the module docstring)."""
    stamp = []
    for rel, _ in files:
        st = (root / rel).stat()
        stamp.append([rel, st.st_size, st.st_mtime_ns])
    spec = {
        "format": CACHE_FORMAT, "root": str(root), "files": stamp, "size": image_size,
        "mode": "L" if grayscale else "RGB", "seed": seed, "test_fraction": test_fraction,
    }
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()


def _decode(path: Path, image_size: int, mode: str) -> np.ndarray | None:
    """One image as uint8 (C, H, W), or None when Pillow cannot read it."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            # draft() lets the JPEG decoder downscale by 2-8x while decoding: far faster for big photos.
            img.draft(mode, (image_size, image_size))
            img = img.convert(mode).resize((image_size, image_size), Image.Resampling.BILINEAR)
            arr = np.asarray(img, dtype=np.uint8)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return None
    return arr[None, :, :] if arr.ndim == 2 else arr.transpose(2, 0, 1)


def stratified_split(labels: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded per-class split into (train, test) index arrays, both sorted.

    Each class with at least two samples keeps at least one on each side, so
    every class is both learned and measured.
    """
    rng = np.random.default_rng(seed)
    train: list[np.ndarray] = []
    test: list[np.ndarray] = []
    for c in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == c))
        n = len(members)
        n_test = int(round(n * test_fraction))
        n_test = min(max(n_test, 1 if n >= 2 else 0), n - 1)
        test.append(members[:n_test])
        train.append(members[n_test:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def _build(root: Path, classes: list[str], files: list[tuple[str, int]], image_size: int,
           grayscale: bool, seed: int, test_fraction: float) -> dict[str, np.ndarray]:
    mode = "L" if grayscale else "RGB"
    workers = min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:  # Pillow releases the GIL while decoding
        decoded = list(pool.map(lambda f: _decode(root / f[0], image_size, mode), files))
    skipped = [rel for (rel, _), img in zip(files, decoded) if img is None]
    kept = [(img, label) for (_, label), img in zip(files, decoded) if img is not None]
    present = sorted({label for _, label in kept})
    if len(present) < 2:
        raise ZsgdError(
            f"{root} has readable images in {len(present)} class folder(s); a classifier needs at least 2: "
            "add one subfolder of images per class"
        )
    # Classes whose images all failed to decode are dropped; relabel densely.
    remap = {old: new for new, old in enumerate(present)}
    x = np.stack([img for img, _ in kept])
    y = np.asarray([remap[label] for _, label in kept], dtype=np.int64)
    train, test = stratified_split(y, test_fraction, seed)
    return {
        "x_train": x[train], "y_train": y[train], "x_test": x[test], "y_test": y[test],
        "classes": np.asarray([classes[i] for i in present]),
        "skipped": np.asarray(skipped, dtype=str),
        "format": np.asarray([CACHE_FORMAT]),
    }


def _read_cache(path: Path) -> dict[str, np.ndarray] | None:
    """A damaged, partial or older-format cache is None: rebuilt, never fatal."""
    arrays = read_array_cache(path, ("x_train", "y_train", "x_test", "y_test", "classes", "skipped", "format"))
    return arrays if arrays is not None and int(arrays["format"][0]) == CACHE_FORMAT else None


def _write_cache(path: Path, arrays: dict[str, np.ndarray]) -> None:
    failed = write_array_cache(path, arrays)
    if failed is not None:
        log.warning("could not cache decoded images at %s: %s", path, failed)


def imagefolder_cache_dir() -> Path:
    """Where decoded image folders are cached."""
    return data_home() / "imagefolder"


def load_imagefolder(
    path: str | Path,
    image_size: int = 64,
    grayscale: bool = False,
    seed: int = DEFAULT_SEED,
    test_fraction: float = DEFAULT_TEST_FRACTION,
    use_cache: bool = True,
) -> Dataset:
    """Load a folder of class subfolders as a ``Dataset`` named ``imagefolder:PATH``."""
    from zsgd.data.arrays import Dataset

    root = Path(path).expanduser()
    if not root.is_dir():
        raise ZsgdError(f"image folder {root} does not exist or is not a directory: pass a folder of class subfolders")
    if not 8 <= image_size <= 1024:
        raise ZsgdError(f"image size {image_size} is out of range: use 8 to 1024 pixels")
    if not 0.0 < test_fraction < 1.0:
        raise ZsgdError(f"test fraction {test_fraction} is out of range: use a value between 0 and 1")
    root = root.resolve()
    classes, files = list_image_folder(root)
    if not files:
        raise ZsgdError(
            f"{root} holds no images in class subfolders: expected {root}/<class>/<image>.jpg "
            "(one subfolder per class, like Caltech101's 101_ObjectCategories)"
        )
    if len(classes) < 2:
        raise ZsgdError(f"{root} has only one class folder ({classes[0]}): a classifier needs at least 2")
    key = cache_key(root, files, image_size, grayscale, seed, test_fraction)
    cache_file = imagefolder_cache_dir() / f"{key[:24]}.npz"
    arrays = _read_cache(cache_file) if use_cache else None
    source = str(root)
    if arrays is None:
        arrays = _build(root, classes, files, image_size, grayscale, seed, test_fraction)
        if use_cache:
            _write_cache(cache_file, arrays)
    else:
        source = f"{root} (cached decode {cache_file})"
    if len(arrays["y_test"]) == 0:  # a class with one image keeps it for training: all singletons leave no test set
        raise ZsgdError(f"{root} has one readable image per class, which leaves none to test on: a class folder needs at "
                        f"least 2 images to give one to the test set ({test_fraction:.0%} of each class is held out)")
    skipped = [str(s) for s in arrays["skipped"]]
    if skipped:
        log.warning("skipped %d unreadable image(s) in %s, e.g. %s", len(skipped), root, skipped[0])
    return Dataset(
        name=f"imagefolder:{root}",
        source=source,
        x_train=arrays["x_train"],
        y_train=arrays["y_train"].astype(np.int64),
        x_test=arrays["x_test"],
        y_test=arrays["y_test"].astype(np.int64),
        classes=[str(c) for c in arrays["classes"]],
        skipped=skipped,
    )
