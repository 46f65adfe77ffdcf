"""Reading and writing IDX files, the format of MNIST and Fashion-MNIST.

An IDX file is a 4-byte magic number (two zero bytes, a type code, the number
of dimensions), one big-endian uint32 per dimension, then the raw values. The
files are usually distributed gzipped and sometimes stored decompressed under
the same or a different name, so compression is detected from the first bytes
rather than from the file name.

Only the two layouts that the data sets use are accepted: ``0x00000801``
(labels, uint8, one dimension) and ``0x00000803`` (images, uint8, three
dimensions). Everything is validated before it is trusted: the magic, the
dimensions, and that the byte count is exactly what the header promises, so a
truncated download or a corrupt archive becomes one clear ``ZsgdError`` naming
the file instead of a reshape error deep inside training.
"""

from __future__ import annotations

import gzip
import io
import struct
import zlib
from pathlib import Path
from typing import BinaryIO

import numpy as np

from zsgd.errors import ZsgdError

GZIP_MAGIC = b"\x1f\x8b"
LABELS_MAGIC = 0x00000801
IMAGES_MAGIC = 0x00000803
_NDIM_FOR_MAGIC = {LABELS_MAGIC: 1, IMAGES_MAGIC: 3}
_KIND_FOR_MAGIC = {LABELS_MAGIC: "labels", IMAGES_MAGIC: "images"}
# A sanity bound on one dimension: rejects garbage headers before allocating.
_MAX_DIM = 1 << 28
_CHUNK = 1 << 20
_GZIP_MAX_RATIO = 1032  # deflate's best case: 258 bytes from 2 bits


def is_gzip(path: str | Path) -> bool:
    """True when the file starts with the gzip magic bytes (its name is irrelevant)."""
    with open(path, "rb") as handle:
        return handle.read(2) == GZIP_MAGIC


def _read_exact(stream: BinaryIO, n: int) -> bytes:
    data = stream.read(n)
    return data if data is not None else b""


def read_idx(path: str | Path, expect: str | None = None) -> np.ndarray:
    """Read an IDX file (gzipped or raw) into a writable uint8 array.

    ``expect`` may be ``"labels"`` or ``"images"`` to insist on one layout.
    Raises ``ZsgdError`` naming the file for a missing file, bad gzip, wrong
    magic, absurd dimensions, or a byte count that does not match the header.
    """
    path = Path(path)
    if not path.is_file():
        raise ZsgdError(f"IDX file {path} does not exist: check the path or re-download the data set")
    try:
        with open(path, "rb") as raw:
            size = raw.seek(0, 2)
            raw.seek(0)
            if raw.read(2) == GZIP_MAGIC:
                raw.seek(-4, 2)
                isize = struct.unpack("<I", raw.read(4))[0] if size >= 18 else None
                raw.seek(0)
                with gzip.GzipFile(fileobj=raw, mode="rb") as gz:
                    return _read_stream(gz, path, expect, _gzip_capacity(size, isize))  # type: ignore[arg-type]
            raw.seek(0)
            return _read_stream(raw, path, expect, (size, True))
    except ZsgdError:
        raise
    except (EOFError, gzip.BadGzipFile, zlib.error) as exc:
        raise ZsgdError(
            f"{path} is a corrupt or truncated gzip file ({exc}): delete it and download it again"
        ) from None
    except OSError as exc:
        raise ZsgdError(f"cannot read {path}: {exc.strerror or exc}") from None


def _gzip_capacity(compressed: int, isize: int | None) -> tuple[int, bool]:
    """(most bytes a gzip file of ``compressed`` bytes can expand to, whether that is its exact size).

    The trailer's size field is exact below 4 GiB (IDX files are single gzip members)."""
    bound = compressed * _GZIP_MAX_RATIO + 1024
    if isize is not None and bound < 1 << 32:
        return isize, True
    return bound, False


def _read_stream(stream: BinaryIO, path: Path, expect: str | None, capacity: tuple[int, bool] | None = None) -> np.ndarray:
    header = _read_exact(stream, 4)
    if len(header) < 4:
        raise ZsgdError(f"{path} is too short to be an IDX file ({len(header)} bytes): download it again")
    (magic,) = struct.unpack(">I", header)
    if magic not in _NDIM_FOR_MAGIC:
        raise ZsgdError(
            f"{path} is not a uint8 IDX labels/images file (magic 0x{magic:08x}, expected 0x00000801 "
            f"or 0x00000803): point zsgd at the original MNIST-format files"
        )
    kind = _KIND_FOR_MAGIC[magic]
    if expect is not None and expect != kind:
        raise ZsgdError(f"{path} holds IDX {kind}, but {expect} were expected: check the file names")
    ndim = _NDIM_FOR_MAGIC[magic]
    dims_raw = _read_exact(stream, 4 * ndim)
    if len(dims_raw) < 4 * ndim:
        raise ZsgdError(f"{path} is truncated inside its IDX header: download it again")
    dims = struct.unpack(f">{ndim}I", dims_raw)
    if any(d == 0 or d > _MAX_DIM for d in dims):
        raise ZsgdError(f"{path} has implausible IDX dimensions {dims}: the file is corrupt")
    header_bytes, promised = 4 + 4 * ndim, int(np.prod(dims, dtype=object))
    if capacity is not None and promised > capacity[0] - header_bytes:  # checked before allocating
        if capacity[1]:
            raise ZsgdError(f"{path} is truncated: header promises {promised} data bytes, found "
                            f"{max(0, capacity[0] - header_bytes)}; download it again")
        raise ZsgdError(f"{path}: its IDX header promises {' x '.join(map(str, dims))} values, more than a file of this size "
                        f"can hold: the file is corrupt; download it again")
    out = np.empty(dims, dtype=np.uint8)
    view = memoryview(out.reshape(-1))
    filled = 0
    while filled < out.size:
        n = stream.readinto(view[filled : filled + _CHUNK])  # type: ignore[attr-defined]
        if not n:
            break
        filled += n
    if filled < out.size:
        raise ZsgdError(
            f"{path} is truncated: header promises {out.size} data bytes, found {filled}; download it again"
        )
    # Reading to the end also makes gzip check its CRC and length trailer.
    extra = 0
    while True:
        rest = _read_exact(stream, _CHUNK)
        if not rest:
            break
        extra += len(rest)
    if extra:
        raise ZsgdError(f"{path} has {extra} bytes after the data its IDX header describes: the file is corrupt")
    return out


def write_idx(path: str | Path, array: np.ndarray, compress: bool | None = None) -> Path:
    """Write a uint8 array of 1 (labels) or 3 (images) dimensions as IDX.

    ``compress=None`` gzips when the name ends in ``.gz``. Used to build test
    fixtures and fake mirrors; gzip's header time is fixed at 0 so the bytes
    depend on the data only.
    """
    path = Path(path)
    arr = np.ascontiguousarray(array)
    if arr.dtype != np.uint8:
        raise ValueError(f"IDX writer supports uint8 only, got {arr.dtype}")
    magic = {1: LABELS_MAGIC, 3: IMAGES_MAGIC}.get(arr.ndim)
    if magic is None:
        raise ValueError(f"IDX writer supports 1-D labels or 3-D images, got shape {arr.shape}")
    payload = struct.pack(f">I{arr.ndim}I", magic, *arr.shape) + arr.tobytes()
    if compress is None:
        compress = path.name.endswith(".gz")
    if compress:
        buffer = io.BytesIO()
        with gzip.GzipFile(fileobj=buffer, mode="wb", mtime=0) as gz:
            gz.write(payload)
        payload = buffer.getvalue()
    path.write_bytes(payload)
    return path
