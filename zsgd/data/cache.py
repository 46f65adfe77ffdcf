"""Where zsgd keeps downloaded and derived data.

One function decides the cache root so that ``zsgd data download``, the
loaders and the image-folder cache always agree on it. ``ZSGD_HOME`` wins
(clusters often want the cache on a shared or scratch disk); otherwise the XDG
convention, so zsgd's data sits next to every other tool's cache.
"""

from __future__ import annotations

import os
from pathlib import Path


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
