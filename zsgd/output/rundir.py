"""The run directory: every run or simulation leaves one, laid out the same.

``config.yaml`` (resolved configuration), ``metrics.jsonl`` (events),
``summary.json``, ``weights.npz`` / checkpoints and ``*.png`` plots. Writes
that a crash could tear (summary, checkpoints) go through a temporary file
and ``os.replace`` so a reader never sees half a file.
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from zsgd.errors import ZsgdError


def create_run_dir(out: str | os.PathLike | None, name: str, root: str | os.PathLike = "runs") -> Path:
    """Make (or reuse, if empty) the run directory and check it is writable now,
    not at the end of a two-hour run."""
    if out is None:
        slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-")[:100].strip("-") or "run"  # file names end at 255 bytes
        path = Path(root) / f"{time.strftime('%Y%m%d-%H%M%S')}-{slug}"
        n = 1
        while path.exists():
            n += 1
            path = Path(root) / f"{time.strftime('%Y%m%d-%H%M%S')}-{slug}-{n}"
    else:
        path = check_out_dir(out)
        if (path / "metrics.jsonl").exists() or (path / "results.csv").exists():
            for leftover in NEVER_STARTED_FILES:  # a failed start's files (check_out_dir let them pass): this run replaces them
                (path / leftover).unlink(missing_ok=True)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise ZsgdError(f"cannot write to output directory {path}: {exc.strerror or exc}; choose another with --out") from None
    return path


MAX_PATH_BYTES = 4095  # Linux PATH_MAX less its NUL
MAX_NAME_BYTES = 255  # NAME_MAX: one component of a path


def check_path_name(flag: str, path: str | os.PathLike) -> None:
    """ZsgdError unless ``path`` can name a file at all: no NUL, at most ``MAX_PATH_BYTES``, each part at most
    ``MAX_NAME_BYTES`` (else every open, stat or mkdir of it fails with "File name too long", far from the flag)."""
    raw = os.fsencode(path)
    text = os.fsdecode(raw)
    shown = repr(text if len(text) <= 60 else text[:57] + "...")
    if b"\0" in raw:
        raise ZsgdError(f"{flag} {shown} holds a NUL byte")
    if len(raw) > MAX_PATH_BYTES:
        raise ZsgdError(f"{flag} {shown} is {len(raw):,} bytes long; a path has at most {MAX_PATH_BYTES:,}")
    part = max(raw.split(b"/"), key=len)
    if len(part) > MAX_NAME_BYTES:
        raise ZsgdError(f"{flag} {shown} has a name of {len(part):,} bytes; a file or folder name has at most {MAX_NAME_BYTES}")


def check_out_dir(out: str | os.PathLike) -> Path:
    """``--out`` as a Path if a run may be written there; ZsgdError otherwise (commands call it before loading data).

    Refused: an empty string (it would mean the current directory), a file, a
    directory holding a run that started; a run that never started may be reused."""
    if not str(out).strip():
        raise ZsgdError("--out must name a directory, got an empty string")
    check_path_name("--out", out)
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise ZsgdError(f"--out {path} is a file, not a directory")
    if ((path / "metrics.jsonl").exists() or (path / "results.csv").exists()) and not never_started(path):
        hint = f" (or continue it with 'zsgd run --resume {path}')" if (path / "checkpoint.json").exists() else ""
        raise ZsgdError(f"{path} already holds a run; choose another --out{hint}")
    return path


NEVER_STARTED_FILES = ("config.yaml", "metrics.jsonl")
_STARTED_FILES = ("summary.json", "checkpoint.json", "checkpoint.npz", "weights.npz", "results.csv")
_SETUP_EVENTS = {"start", "worker"}


def never_started(path: Path) -> bool:
    """True if ``path`` holds only what a run that failed to start leaves: a config and a metrics file
    with no training event (no train, eval or update line, no checkpoint, no summary)."""
    path = Path(path)
    if any((path / name).exists() for name in _STARTED_FILES):
        return False
    metrics = path / "metrics.jsonl"
    if not metrics.exists():
        return True
    try:
        if metrics.stat().st_size > 1 << 20:
            return False
        lines = metrics.read_text(errors="replace").splitlines()
    except OSError:
        return False
    for line in lines:
        try:
            event = json.loads(line)
        except ValueError:
            return False
        if not isinstance(event, dict) or event.get("event") not in _SETUP_EVENTS:
            return False
    return True


def atomic_write_bytes(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def json_safe(obj: Any) -> Any:
    """``obj`` with NaN and infinities as None and numpy scalars as Python numbers.

    Strict JSON has no NaN: a summary that holds one is rejected by other
    parsers (``jq``, browsers), so a missing number is written as null.
    """
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(json_safe(obj), indent=2, sort_keys=False, allow_nan=False) + "\n").encode())


def save_arrays(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Save named arrays as ``.npz`` atomically (no pickle: plain arrays only)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".npz")
    os.close(fd)
    try:
        np.savez(tmp, **{k: np.array(v, order="C", copy=None) for k, v in arrays.items()})  # keeps 0-d arrays 0-d
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_arrays(path: Path) -> dict[str, np.ndarray]:
    """The arrays of an ``.npz``; ZsgdError for a missing, empty, truncated or corrupted file.

    A damaged zip raises many kinds of error inside numpy and zipfile (EOFError among them, which
    click would report as "interrupted"); all of them are one line here."""
    import zipfile
    import zlib

    try:
        if Path(path).stat().st_size == 0:
            raise ZsgdError(f"cannot read {path}: the file is empty")
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, zlib.error, MemoryError, NotImplementedError) as exc:
        detail = " ".join(str(exc).split())[:200] or type(exc).__name__
        raise ZsgdError(f"cannot read {path}: {detail} (the file is damaged)") from None
    except (AttributeError, TypeError):  # np.load returned a plain array: a .npy, not an .npz
        raise ZsgdError(f"cannot read {path}: not an .npz archive") from None
