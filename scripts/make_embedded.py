#!/usr/bin/env python3
"""Build zsgd/data/embedded/fashion-mnist-subset.npz, the data set shipped with zsgd.

Deterministic: the same source files and seed give byte-identical output
(zip entries carry a fixed 1980-01-01 timestamp, xz output depends only on
its input and preset), so the shipped file can be re-derived and checked.

Source: the four Fashion-MNIST IDX files, by default from Debian's
``dataset-fashion-mnist`` package. Debian's ``.gz`` files differ from the
upstream ones only in their gzip header (strip-nondeterminism drops the file
name and resets the time stamp), so the *decompressed* contents are checked
against the SHA-256 sums below, which are those of the upstream data.

Selection: from each class, 1,000 training and 200 test images drawn without
replacement with ``numpy.random.default_rng(SEED)``, kept in their original
order. Both encodings (xz-packed raw arrays, ``np.savez_compressed``) are
built and the smaller is written.

    python scripts/make_embedded.py [--source DIR] [--out FILE] [--seed N]
"""

from __future__ import annotations

import argparse
import hashlib
import io
import sys
import zipfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from zsgd.data.datasets import FASHION_MNIST_CLASSES, find_idx_files  # noqa: E402
from zsgd.data.embedded import ARRAY_NAMES, encode_xz  # noqa: E402
from zsgd.data.idx import read_idx  # noqa: E402

SEED = 20240607
TRAIN_PER_CLASS = 1000
TEST_PER_CLASS = 200
MAX_BYTES = 6_000_000
DEFAULT_SOURCE = Path("/usr/share/datasets/fashion-mnist")
DEFAULT_OUT = ROOT / "zsgd" / "data" / "embedded" / "fashion-mnist-subset.npz"
# SHA-256 of the decompressed upstream IDX files (identical in Debian's package).
DECOMPRESSED_SHA256 = {
    "x_train": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
    "y_train": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
    "x_test": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
    "y_test": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
}
_ZIP_TIME = (1980, 1, 1, 0, 0, 0)


def stratified(labels: np.ndarray, per_class: int, rng: np.random.Generator) -> np.ndarray:
    """``per_class`` indices of each class, drawn without replacement, returned sorted."""
    picks = [rng.choice(np.flatnonzero(labels == c), per_class, replace=False) for c in range(10)]
    return np.sort(np.concatenate(picks))


def idx_payload_sha256(array: np.ndarray) -> str:
    """SHA-256 of the IDX file that holds ``array`` (header + data), decompressed."""
    magic = 0x801 if array.ndim == 1 else 0x803
    header = magic.to_bytes(4, "big") + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return hashlib.sha256(header + np.ascontiguousarray(array).tobytes()).hexdigest()


def zip_bytes(entries: dict[str, np.ndarray], compression: int) -> bytes:
    """An npz archive with fixed entry times, so equal arrays give equal bytes."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for key in sorted(entries):
            npy = io.BytesIO()
            np.lib.format.write_array(npy, np.asarray(entries[key]), allow_pickle=False)
            info = zipfile.ZipInfo(f"{key}.npy", date_time=_ZIP_TIME)
            info.compress_type = compression
            info.external_attr = 0o644 << 16
            archive.writestr(info, npy.getvalue(), compresslevel=9 if compression == zipfile.ZIP_DEFLATED else None)
    return buffer.getvalue()


def select(source: Path, seed: int, verify: bool = True) -> tuple[dict, dict, dict]:
    """``(meta, subset, provenance)`` arrays drawn from the IDX files in ``source``; ValueError if they are
    missing or (``verify``) not the upstream files."""
    found, missing = find_idx_files(source)
    if missing:
        raise ValueError(f"{source} lacks {missing}")
    full = {role: read_idx(path) for role, path in found.items()}
    for role, array in full.items():
        digest = idx_payload_sha256(array)
        if digest != DECOMPRESSED_SHA256[role] and verify:
            raise ValueError(f"{found[role]} is not the upstream Fashion-MNIST file (sha256 {digest}); use --no-verify")
    rng = np.random.default_rng(seed)
    train_idx = stratified(full["y_train"], TRAIN_PER_CLASS, rng)
    test_idx = stratified(full["y_test"], TEST_PER_CLASS, rng)
    subset = {
        "x_train": full["x_train"][train_idx][:, None, :, :],
        "y_train": full["y_train"][train_idx],
        "x_test": full["x_test"][test_idx][:, None, :, :],
        "y_test": full["y_test"][test_idx],
    }
    meta = {
        "classes": np.asarray(FASHION_MNIST_CLASSES),
        "format": np.asarray([1], dtype=np.int64),
        "seed": np.asarray([seed], dtype=np.int64),
    }
    provenance = {"train_indices": train_idx.astype(np.uint16), "test_indices": test_idx.astype(np.uint16)}
    return meta, subset, provenance


def xz_archive(meta: dict[str, np.ndarray], arrays: dict[str, np.ndarray], encode=encode_xz) -> bytes:
    """The xz encoding's npz bytes: ``meta`` as it is, each of ``arrays`` through ``encode`` (the test
    passes one that reuses the shipped payloads of the big arrays, whose xz takes seconds)."""
    entries = dict(meta)
    for name, array in arrays.items():
        entries.update(encode(name, array))
    return zip_bytes(entries, zipfile.ZIP_STORED)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", type=Path, default=DEFAULT_SOURCE, help="directory with the four IDX files")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--no-verify", action="store_true", help="skip the source checksum check")
    args = parser.parse_args(argv)

    try:
        meta, subset, provenance = select(args.source, args.seed, verify=not args.no_verify)
    except ValueError as exc:
        parser.error(str(exc))
    candidates = {
        "xz": xz_archive(meta, {**subset, **provenance}),
        "savez_compressed": zip_bytes({**meta, **subset, **provenance}, zipfile.ZIP_DEFLATED),
    }
    for label, blob in candidates.items():
        print(f"{label:>17}: {len(blob):,} bytes")
    choice = min(candidates, key=lambda k: len(candidates[k]))
    blob = candidates[choice]
    if len(blob) > MAX_BYTES:
        parser.error(f"output would be {len(blob):,} bytes, over the {MAX_BYTES:,} limit")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_bytes(blob)
    counts = {n: np.bincount(subset[n], minlength=10).tolist() for n in ARRAY_NAMES if n.startswith("y")}
    print(f"wrote {args.out} ({choice}, {len(blob):,} bytes, sha256 {hashlib.sha256(blob).hexdigest()})")
    print(f"per-class counts: {counts}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
