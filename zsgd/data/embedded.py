"""The Fashion-MNIST subset shipped inside the package.

Why ship data at all: ``zsgd run`` and ``zsgd sim`` must work on a fresh
install with no network (clusters and CI often have none), and tests need a
real, learnable data set. 10,000 train / 2,000 test images, stratified
(1,000 / 200 per class), is enough for a model to learn visibly in seconds
and small enough to ship (under 6 MB).

File format: a plain ``.npz`` (read with ``allow_pickle=False``). Each array
``NAME`` is stored either directly (``np.savez_compressed``) or, when that is
smaller, as xz bytes ``NAME.xz`` with ``NAME.shape`` and ``NAME.dtype``; xz
(LZMA) packs these images about 15% tighter than zlib. ``scripts/make_embedded.py``
writes it deterministically and picks the smaller encoding.

Decoding the xz arrays costs most of a second of CPU, and every process of a
run (broker, each worker, the evaluator) loads the set: the decoded arrays
are cached uncompressed in the zsgd cache (``<zsgd_home>/data/embedded/``)
under the file's sha256, so a changed file is never read stale, and a second
load is a file read. A cache that cannot be written or read is skipped, never
fatal.
"""

from __future__ import annotations

import hashlib
import lzma
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from zsgd.data.cache import read_array_cache, write_array_cache
from zsgd.errors import ZsgdError

if TYPE_CHECKING:
    from zsgd.data.arrays import Dataset

EMBEDDED_PATH = Path(__file__).resolve().parent / "embedded" / "fashion-mnist-subset.npz"
EMBEDDED_SOURCE = "embedded subset shipped with zsgd"
ARRAY_NAMES = ("x_train", "y_train", "x_test", "y_test")


def encode_xz(name: str, array: np.ndarray, preset: int = 9 | lzma.PRESET_EXTREME) -> dict[str, np.ndarray]:
    """One array as the three npz entries of the xz encoding (used by the build script)."""
    arr = np.ascontiguousarray(array)
    if arr.dtype.hasobject:
        raise ValueError("object arrays cannot be stored without pickle")
    packed = lzma.compress(arr.tobytes(), format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC64, preset=preset)
    return {
        f"{name}.xz": np.frombuffer(packed, dtype=np.uint8),
        f"{name}.shape": np.asarray(arr.shape, dtype=np.int64),
        f"{name}.dtype": np.asarray(arr.dtype.str),
    }


def _decode(store: np.lib.npyio.NpzFile, name: str) -> np.ndarray:
    if name in store.files:
        return np.array(store[name])
    dtype = np.dtype(str(store[f"{name}.dtype"]))
    if dtype.hasobject:
        raise ValueError(f"{name}: object dtype is not allowed")
    shape = tuple(int(d) for d in store[f"{name}.shape"])
    raw = lzma.decompress(store[f"{name}.xz"].tobytes(), format=lzma.FORMAT_XZ)
    flat = np.frombuffer(bytearray(raw), dtype=dtype)
    return flat.reshape(shape)


def read_embedded_arrays(path: str | Path = EMBEDDED_PATH) -> dict[str, np.ndarray]:
    """Every array in the embedded file, decoded, by name (the four splits, classes, provenance)."""
    path = Path(path)
    if not path.is_file():
        raise ZsgdError(f"embedded data file {path} is missing: reinstall zsgd (pip install --force-reinstall zsgd)")
    try:
        blob = path.read_bytes()
    except OSError as exc:
        raise ZsgdError(f"embedded data file {path} is corrupt ({exc}): reinstall zsgd") from None
    cache = _cache_path(hashlib.sha256(blob).hexdigest())
    arrays = read_array_cache(cache, ARRAY_NAMES)
    if arrays is not None:
        return arrays
    try:
        with np.load(path, allow_pickle=False) as store:
            names = sorted({f.split(".", 1)[0] for f in store.files})
            arrays = {name: _decode(store, name) for name in names}
    except (OSError, ValueError, KeyError, lzma.LZMAError, zipfile.BadZipFile, EOFError) as exc:
        raise ZsgdError(f"embedded data file {path} is corrupt ({exc}): reinstall zsgd") from None
    write_array_cache(cache, arrays)  # a read-only or full cache: decoded again next time
    return arrays


def _cache_path(sha256: str) -> Path:
    from zsgd.data.cache import data_home

    return data_home() / "embedded" / f"{sha256[:24]}.npz"


def load_embedded(path: str | Path = EMBEDDED_PATH) -> Dataset:
    """The shipped stratified Fashion-MNIST subset as a ``Dataset`` named ``embedded``."""
    from zsgd.data.arrays import FASHION_MNIST_CLASSES, Dataset

    arrays = read_embedded_arrays(path)
    missing = [n for n in ARRAY_NAMES if n not in arrays]
    if missing:
        raise ZsgdError(f"embedded data file {path} lacks {', '.join(missing)}: reinstall zsgd")
    classes = [str(c) for c in arrays["classes"]] if "classes" in arrays else list(FASHION_MNIST_CLASSES)
    return Dataset(
        name="embedded",
        source=EMBEDDED_SOURCE,
        x_train=arrays["x_train"].astype(np.uint8, copy=False),
        y_train=arrays["y_train"].astype(np.int64),
        x_test=arrays["x_test"].astype(np.uint8, copy=False),
        y_test=arrays["y_test"].astype(np.int64),
        classes=classes,
    )
