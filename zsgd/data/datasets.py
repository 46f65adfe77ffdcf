"""Data sets by name: where they are found, and the one in-memory shape they share.

Every data set, whatever its origin (IDX files, the embedded subset, a folder
of images), becomes the same ``Dataset``: uint8 images ``(N, C, H, W)`` and
int64 labels. uint8 keeps a worker's copy four times smaller than float32;
``to_float`` converts a batch at the moment it is used.

Lookup order for ``fashion-mnist``: an explicit ``data_dir``, then the zsgd
cache (filled by ``zsgd data download``), then Debian's
``dataset-fashion-mnist`` package. ``default`` is full Fashion-MNIST when any
of those has it, else the embedded subset, so ``zsgd run`` works offline on a
fresh install; ``Dataset.name`` and ``Dataset.source`` say which was used.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from zsgd.data.arrays import FASHION_MNIST_CLASSES, Dataset, to_float  # noqa: F401  (re-exported)
from zsgd.data.cache import dataset_cache_dir
from zsgd.errors import ZsgdError

if TYPE_CHECKING:
    from zsgd.data.text import TextDataset

# Debian's dataset-fashion-mnist package; a module attribute so tests can point it elsewhere.
SYSTEM_FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")

MNIST_CLASSES = [str(d) for d in range(10)]
IDX_DATASETS = {"fashion-mnist": FASHION_MNIST_CLASSES, "mnist": MNIST_CLASSES}
# The four files of an MNIST-format data set, by role; the base names on disk.
IDX_FILES = {
    "x_train": "train-images-idx3-ubyte",
    "y_train": "train-labels-idx1-ubyte",
    "x_test": "t10k-images-idx3-ubyte",
    "y_test": "t10k-labels-idx1-ubyte",
}
KNOWN_NAMES = ("default", "fashion-mnist", "mnist", "embedded", "imagefolder:PATH", "text[:FILE]")
_ALIASES = {"fashion_mnist": "fashion-mnist", "fashionmnist": "fashion-mnist", "fmnist": "fashion-mnist"}


def find_idx_files(directory: str | Path) -> tuple[dict[str, Path], list[str]]:
    """Find the four IDX files in ``directory``: ``(found by role, missing base names)``.

    Accepts ``name.gz``, the decompressed ``name`` and the dotted ``train-images.idx3-ubyte``
    spelling some mirrors use; whether a file is gzipped is decided by its bytes.
    """
    directory = Path(directory)
    found: dict[str, Path] = {}
    missing: list[str] = []
    for role, base in IDX_FILES.items():
        dotted = base.replace("-idx", ".idx")
        for candidate in (f"{base}.gz", base, f"{dotted}.gz", dotted):
            path = directory / candidate
            if path.is_file():
                found[role] = path
                break
        else:
            missing.append(base)
    return found, missing


def idx_search_dirs(name: str) -> list[Path]:
    """Where ``name`` is looked for when no ``data_dir`` is given, in order."""
    dirs = [dataset_cache_dir(name)]
    if name == "fashion-mnist":
        dirs.append(SYSTEM_FASHION_MNIST_DIR)
    return dirs


def locate_idx_dataset(name: str, data_dir: str | Path | None = None) -> Path | None:
    """The directory that holds all four files of ``name``, or None."""
    candidates = [Path(data_dir)] if data_dir is not None else idx_search_dirs(name)
    for directory in candidates:
        _, missing = find_idx_files(directory)
        if not missing:
            return directory
    return None


_LOADED: dict[tuple, dict[str, np.ndarray]] = {}  # this process's decoded IDX files, by their stat (see _read_idx_files)
SETTLED_NS = 2_000_000_000  # a file changed less than this ago may change again within one timestamp tick: not memoized


def _stat_key(found: dict[str, Path]) -> tuple | None:
    """What identifies the files' contents without reading them, or None when one was changed too recently
    to be trusted (the "racy" case: a rewrite within the same timestamp tick would keep the key)."""
    import time

    try:
        stats = [(role, str(path), os.stat(path)) for role, path in sorted(found.items())]
    except OSError:
        return None
    if any(time.time_ns() - max(st.st_mtime_ns, st.st_ctime_ns) < SETTLED_NS for _r, _p, st in stats):
        return None
    return tuple((role, path, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev) for role, path, st in stats)


def _read_idx_files(found: dict[str, Path]) -> dict[str, np.ndarray]:
    """The four IDX files decoded; kept uncompressed in the zsgd cache under the sha256 of their bytes,
    because every process of a run loads them (gunzip of Fashion-MNIST: about 0.5 s of CPU per process,
    against about 0.1 s to hash the files and read the cache). Once decoded, they are also kept in this
    process under the files' stat: a worker or evaluator forked from the ``zsgd run`` process (or an arm
    forked from ``zsgd sim``) then has them at once, shared copy-on-write, with no hash and no read."""
    key = _stat_key(found)
    if key is not None and key in _LOADED:
        return _LOADED[key]
    arrays = _decode_idx_files(found, key)
    if key is not None:
        _LOADED.clear()  # one data set at a time: a long-lived process (tests) must not hold every one it loaded
        _LOADED[key] = arrays
    return arrays


def _decode_idx_files(found: dict[str, Path], key: tuple | None = None) -> dict[str, np.ndarray]:
    """The decoded cache's arrays (its name: the files' sha256, remembered per machine under their settled
    stat ``key``, so hashing 30 MB is done once, not by every process), else the files decoded and cached."""
    import hashlib

    from zsgd.data.cache import data_home, read_array_cache, write_array_cache
    from zsgd.data.idx import read_idx

    known = data_home() / "idx" / "by-stat" / hashlib.sha256(repr(key).encode()).hexdigest()[:24] if key is not None else None
    try:
        name = known.read_text().strip() if known is not None else ""
    except OSError:
        name = ""
    try:
        if len(name) != 24 or name.strip("0123456789abcdef"):
            digest = hashlib.sha256()
            for role, path in sorted(found.items()):
                digest.update(role.encode() + b"\0" + Path(path).read_bytes())
            name = digest.hexdigest()[:24]
            if known is not None:
                _write_atomically(known, name)
        cache: Path | None = data_home() / "idx" / f"{name}.npz"
    except OSError:
        cache = None  # unreadable here: read_idx below says what is wrong
    arrays = read_array_cache(cache, found) if cache is not None else None
    if arrays is not None:
        return arrays
    arrays = {role: read_idx(path, expect="labels" if role.startswith("y") else "images") for role, path in found.items()}
    if cache is not None:
        write_array_cache(cache, arrays)
    return arrays


def _write_atomically(path: Path, text: str) -> None:
    """A small cache file, whole or not at all (processes of one run write it at once); a read-only disk is no error."""
    import tempfile

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as handle:
                handle.write(text)
            os.replace(tmp, path)
        finally:
            Path(tmp).unlink(missing_ok=True)
    except OSError:
        pass


def load_idx_dataset(name: str, directory: str | Path) -> Dataset:
    """Load an MNIST-format data set from ``directory`` and check it is consistent."""
    directory = Path(directory)
    found, missing = find_idx_files(directory)
    if missing:
        raise ZsgdError(
            f"{directory} lacks {', '.join(m + '[.gz]' for m in missing)} for {name}: "
            f"run 'zsgd data download {name}' or pass --data-dir with the four IDX files"
        )
    arrays = _read_idx_files(found)
    classes = IDX_DATASETS.get(name, MNIST_CLASSES)
    for split in ("train", "test"):
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
        if len(x) != len(y):
            raise ZsgdError(
                f"{found['x_' + split]} has {len(x)} images but {found['y_' + split]} has {len(y)} labels: "
                "the files belong to different data sets; download them again"
            )
        if y.size and int(y.max()) >= len(classes):
            raise ZsgdError(
                f"{found['y_' + split]} has label {int(y.max())}, but {name} has {len(classes)} classes: "
                "wrong file for this data set"
            )
    return Dataset(
        name=name,
        source=str(directory),
        x_train=arrays["x_train"][:, None, :, :],
        y_train=arrays["y_train"].astype(np.int64),
        x_test=arrays["x_test"][:, None, :, :],
        y_test=arrays["y_test"].astype(np.int64),
        classes=list(classes),
    )


def _not_found(name: str) -> ZsgdError:
    places = " or ".join(str(d) for d in idx_search_dirs(name))
    extra = ", or use the 'embedded' data set" if name == "fashion-mnist" else ""
    return ZsgdError(
        f"{name} not found in {places}: run 'zsgd data download {name}' or pass --data-dir{extra}"
    )


def load_dataset(
    name: str = "default",
    data_dir: str | None = None,
    image_size: int = 64,
    grayscale: bool = False,
    tokens: str = "chars",
) -> Dataset | TextDataset:
    """Load a data set by name.

    ``name``: ``default``, ``fashion-mnist``, ``mnist``, ``embedded``,
    ``imagefolder:PATH`` (or ``imagefolder`` with ``data_dir`` as the folder)
    or ``text[:FILE]`` (a ``TextDataset`` of ``tokens``; no FILE: the
    embedded corpus).
    ``image_size`` and ``grayscale`` apply to image folders only; the IDX sets
    are 28x28 grayscale as published. With ``default``, a ``data_dir`` is taken
    as a Fashion-MNIST directory.
    """
    raw = name.strip()
    lowered = raw.lower()
    if lowered == "text" or lowered.startswith("text:"):
        from zsgd.data.text import load_text, parse_text_name

        return load_text(parse_text_name(raw), tokens=tokens)
    if lowered.startswith("imagefolder:") or lowered == "imagefolder":
        folder = raw.split(":", 1)[1] if ":" in raw else data_dir
        if not folder:
            raise ZsgdError("data set 'imagefolder' needs a folder: use imagefolder:PATH or --data-dir PATH")
        from zsgd.data.imagefolder import load_imagefolder

        return load_imagefolder(folder, image_size=image_size, grayscale=grayscale)
    key = _ALIASES.get(lowered, lowered)
    if key == "embedded":
        from zsgd.data.embedded import load_embedded

        return load_embedded()
    if key == "default":
        if data_dir is not None:
            return load_idx_dataset("fashion-mnist", data_dir)
        directory = locate_idx_dataset("fashion-mnist")
        if directory is not None:
            return load_idx_dataset("fashion-mnist", directory)
        from zsgd.data.embedded import load_embedded

        return load_embedded()
    if key in IDX_DATASETS:
        if data_dir is not None:
            return load_idx_dataset(key, data_dir)
        directory = locate_idx_dataset(key)
        if directory is None:
            raise _not_found(key)
        return load_idx_dataset(key, directory)
    raise ZsgdError(f"unknown data set '{name}': choose one of {', '.join(KNOWN_NAMES)}")
