"""Where zsgd keeps downloaded and derived data.

One function decides the cache root so that ``zsgd data download``, the
loaders and the image-folder cache always agree on it. ``ZSGD_HOME`` wins
(clusters often want the cache on a shared or scratch disk); otherwise the XDG
convention, so zsgd's data sits next to every other tool's cache.
"""

from __future__ import annotations

import os
import tempfile
import zipfile
from pathlib import Path
from typing import Iterable

import numpy as np


def zsgd_home() -> Path:
    """The zsgd cache root: ``$ZSGD_HOME``, else ``$XDG_CACHE_HOME/zsgd``, else ``~/.cache/zsgd``."""
    explicit = os.environ.get("ZSGD_HOME")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg:
        return Path(xdg).expanduser() / "zsgd"
    return Path.home() / ".cache" / "zsgd"


def data_home() -> Path:
    """Directory holding downloaded data sets and derived caches (``<zsgd_home>/data``)."""
    return zsgd_home() / "data"


def dataset_cache_dir(name: str) -> Path:
    """Where ``zsgd data download NAME`` puts a data set's files."""
    return data_home() / name


def read_array_cache(path: Path, required: Iterable[str]) -> dict[str, np.ndarray] | None:
    """The arrays of a cache file written by ``write_array_cache``, or None when it is absent, damaged
    or lacks one of ``required`` (the caller then decodes again and rewrites it)."""
    try:
        with np.load(path, allow_pickle=False) as store:
            arrays = {name: np.array(store[name]) for name in store.files}
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        return None
    return arrays if set(required) <= arrays.keys() else None


def write_array_cache(path: Path, arrays: dict[str, np.ndarray]) -> OSError | None:
    """Save ``arrays`` atomically (temp file + rename: processes loading at once never read half a file).
    A read-only or full disk is not an error, only a slower next load: the OSError is returned, not raised."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.stem, suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as handle:
                np.savez(handle, **arrays)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError as exc:
        return exc
    return None
