"""zsgd's data layer: IDX and image-folder readers, the embedded default set,
downloads, and per-worker shards.

The public names below are imported on first use (PEP 562), because the CLI
imports ``zsgd.commands.data`` at start-up and ``zsgd --help`` should not pay
for numpy. (The download code lives in ``downloader.py``: a submodule named
``download`` would shadow the ``download`` function on this package.)
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "TextDataset": "text",
    "load_text": "text",
    "TokenStream": "text",
    "Dataset": "datasets",
    "load_dataset": "datasets",
    "to_float": "datasets",
    "FASHION_MNIST_CLASSES": "datasets",
    "MNIST_CLASSES": "datasets",
    "KNOWN_NAMES": "datasets",
    "read_idx": "idx",
    "write_idx": "idx",
    "load_embedded": "embedded",
    "load_imagefolder": "imagefolder",
    "download": "downloader",
    "CHECKSUMS": "downloader",
    "Split": "shards",
    "parse_split": "shards",
    "make_shard": "shards",
    "make_shards": "shards",
    "BatchStream": "shards",
    "zsgd_home": "cache",
    "data_home": "cache",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:
    from zsgd.data.cache import data_home, zsgd_home
    from zsgd.data.datasets import (FASHION_MNIST_CLASSES, KNOWN_NAMES, MNIST_CLASSES, Dataset,
                                    load_dataset, to_float)
    from zsgd.data.downloader import CHECKSUMS, download
    from zsgd.data.embedded import load_embedded
    from zsgd.data.idx import read_idx, write_idx
    from zsgd.data.imagefolder import load_imagefolder
    from zsgd.data.shards import BatchStream, Split, make_shard, make_shards, parse_split


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'zsgd.data' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"zsgd.data.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
