"""The simulator's measured costs, kept: the same command and seed give the same metrics.

Why: ``--compute``, ``--broker-time`` and ``--broker-bandwidth`` default to
``measured`` (timed on this machine), and timing them again on every run
made ``zsgd sim ... --seed 3`` run twice give two sets of metrics, which
the README and the design promise it does not. So every figure is measured
once per machine and per what it measures (the model and batch for a
gradient step; the optimizer, algorithm, codecs and range for the server's
step; the message size for the transport), cached, and read back by every
later run. Where the figures come from:

- ``cache`` (the default): this machine's cache file; a figure it lacks is
  measured and added. A damaged file is one warning line and a re-measure.
- ``recalibrate`` (``--recalibrate``): every figure measured afresh (once
  per process) and written over the cached one.
- ``replay`` (``--calibration FILE``): only the figures in FILE (an arm's
  ``config.yaml``, a sweep's ``calibration.json`` or another machine's cache
  file), nothing measured; a figure FILE lacks is an error, not a silent
  mix of two machines.

Every arm records the figures it used in its ``config.yaml`` (``calibration:``)
and a sweep writes all of them to ``calibration.json``.

The cache is ``<zsgd home>/calibration/<machine>.json`` (``$ZSGD_CALIBRATION_DIR``
overrides the folder; the tests point it at a temporary one). A machine is
its CPU model, core count, architecture, and the Python, numpy, numba and
ZeroMQ versions: what sets the speed of the measured code. Not the host
name, so identical nodes sharing a home directory share one calibration
(and a sweep spread over them sees one set of figures). Entries do not
expire, since an expiry would silently break reproducibility; ``--recalibrate``
is the way to measure again (after a hardware or code change).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import time
from pathlib import Path
from typing import Any, Callable, Iterable

from zsgd.errors import ZsgdError

#: Bump when what a figure measures changes (old entries are then in another file and measured afresh).
FORMAT = 1
KINDS = ("compute", "server_step", "transport", "broker_loop")
MODES = ("cache", "recalibrate", "replay")
MAX_FILE_BYTES = 16 * 2**20  # a calibration is a few KiB; --calibration /dev/zero must not read for ever


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith(("model name", "hardware", "cpu model")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def _version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return "none"


def machine() -> dict[str, Any]:
    """What sets the speed of the measured code on this machine (the cache's key)."""
    import zmq

    return {"cpu": _cpu_model(), "cores": os.cpu_count() or 1, "arch": platform.machine(), "system": platform.system(),
            "python": platform.python_version(), "numpy": _version("numpy"), "numba": _version("numba"),
            "libzmq": zmq.zmq_version(), "format": FORMAT}


def machine_id(m: dict[str, Any]) -> str:
    """A file name for machine ``m``: readable CPU and cores, and a hash of the whole description."""
    digest = hashlib.sha1(json.dumps(m, sort_keys=True).encode()).hexdigest()[:10]
    cpu = re.sub(r"[^A-Za-z0-9]+", "-", str(m.get("cpu", "cpu"))).strip("-")[:40] or "cpu"
    return f"{cpu}-{m.get('cores', 0)}c-{digest}"


def calibration_dir() -> Path:
    explicit = os.environ.get("ZSGD_CALIBRATION_DIR")
    if explicit:
        return Path(explicit).expanduser()
    from zsgd.data.cache import zsgd_home

    return zsgd_home() / "calibration"


def key_text(key: dict[str, Any]) -> str:
    """``{"model": "mlp", "batch_size": 16}`` -> ``"model=mlp batch_size=16"`` (the order given: callers build keys one way)."""
    def text(v: Any) -> str:
        if v is None:
            return "none"
        if isinstance(v, (list, tuple)):
            return "x".join(text(x) for x in v)
        return repr(v) if isinstance(v, float) else str(v)

    return " ".join(f"{k}={text(v)}" for k, v in key.items())


def _finite(v: Any, lo: float = 0.0, hi: float = float("inf")) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and lo <= v <= hi and v == v and v != float("inf")


def valid_entry(kind: str, entry: Any) -> bool:
    """Whether ``entry`` can stand for a figure of ``kind`` (anything else is measured afresh, or refused when replayed)."""
    if not isinstance(entry, dict):
        return False
    if kind == "transport":
        lone = entry.get("lone_bytes_per_s", 1.0)  # absent from a record made before it was measured: replayed without it
        busy = entry.get("lone_threads", 1.0)  # likewise the lone echo's CPU and spread
        return _finite(entry.get("bytes_per_s")) and entry["bytes_per_s"] > 0 and _finite(lone) and lone > 0 \
            and _finite(entry.get("overlap"), 0.0, 1.0) and _finite(busy, 0.0, 2.0) and busy > 0 \
            and _finite(entry.get("lone_spread", 0.0), 0.0, 3.0) and _share(entry)
    if kind == "broker_loop":  # with its own lone echo (bursts beside the broker's) where it was measured with it
        crossings = "lone_bytes_per_s" not in entry or valid_entry("transport", {"bytes_per_s": entry["lone_bytes_per_s"], "overlap": 1.0} | entry)
        return _finite(entry.get("overhead_s")) and valid_entry("server_step", entry) and crossings
    samples = entry.get("samples")
    return isinstance(samples, list) and bool(samples) and all(_finite(s) for s in samples)


def _share(entry: dict[str, Any]) -> bool:
    """The I/O thread's share of a lone exchange: absent (an older record), None (not measurable here) or in (0, 1]."""
    share = entry.get("io_share")
    return share is None or (_finite(share, 0.0, 1.0) and share > 0)


def _older(kind: str, entry: dict[str, Any]) -> bool:
    """Whether ``entry`` was cached before a figure it now holds was measured (the transport's lone echo, its CPU, its
    spread, its I/O thread's share; the broker loop's own lone echo): measured again, quietly (a replayed one is used
    as it is: ``--placement local`` then charges its crossings as that run did)."""
    if kind == "broker_loop":
        return "lone_bytes_per_s" not in entry
    return kind == "transport" and any(k not in entry for k in ("lone_bytes_per_s", "lone_threads", "lone_spread", "io_share"))


def _warn(text: str) -> None:
    from zsgd.output.live import stderr_console

    stderr_console.print(f"[yellow]warning[/]: {text}", highlight=False, markup=True, soft_wrap=True)


def read_record(path: str | Path) -> dict[str, Any]:
    """The calibration in ``path``: an arm's ``config.yaml``, a sweep's ``calibration.json``, a plan or a cache file."""
    p = Path(path).expanduser()
    try:
        if not p.is_file():
            raise ZsgdError(f"--calibration {path}: " + ("not a regular file" if p.exists() else "no such file"))
        with open(p, "rb") as f:
            data = f.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise ZsgdError(f"--calibration {path}: cannot read it ({exc.strerror or exc})") from None
    if len(data) > MAX_FILE_BYTES:
        raise ZsgdError(f"--calibration {path}: larger than {MAX_FILE_BYTES >> 20} MiB; not a calibration")
    try:
        doc: Any = json.loads(data)
    except ValueError:
        import yaml

        try:
            doc = yaml.safe_load(data)
        except yaml.YAMLError as exc:
            raise ZsgdError(f"--calibration {path}: neither JSON nor YAML ({str(exc).splitlines()[0]})") from None
    if isinstance(doc, dict) and isinstance(doc.get("calibration"), dict):
        doc = doc["calibration"]
    if not isinstance(doc, dict) or not any(isinstance(doc.get(k), dict) for k in KINDS):
        raise ZsgdError(f"--calibration {path}: holds no calibration (expected a simulated arm's config.yaml, a sweep's "
                        f"calibration.json or a file from {calibration_dir()})")
    return doc


class Calibration:
    """Where a process's measured figures come from (see the module's docstring), and which ones it used."""

    def __init__(self, mode: str = "cache", replayed: dict[str, Any] | None = None, source: str | None = None) -> None:
        if mode not in MODES:
            raise ValueError(f"calibration mode {mode!r}")
        if (mode == "replay") != (replayed is not None):
            raise ValueError("a replayed calibration, and only that, takes a record")
        self.mode, self.replayed, self.source = mode, replayed, source
        self._memory: dict[tuple[str, str], dict[str, Any]] = {}
        self.origins: dict[tuple[str, str], str] = {}  # (kind, key) -> "cached" | "measured" | "replayed"
        self._machine: dict[str, Any] | None = None
        self._cache: dict[str, Any] | None = None

    @classmethod
    def from_flags(cls, path: str | None, recalibrate: bool) -> "Calibration":
        """``--calibration FILE`` / ``--recalibrate`` (neither: this machine's cache); checked before any work."""
        if path and recalibrate:
            raise ZsgdError("--calibration replays a calibration and --recalibrate measures one: give one of them")
        if path:
            return cls("replay", read_record(path), source=str(path))
        return cls("recalibrate" if recalibrate else "cache")

    def host_cores(self) -> float:
        """The cores ``--host-cores auto`` means: the replayed machine's (its figures were measured with them), else this one's."""
        from zsgd.network.hosts import this_machines_cores

        if self.mode == "replay":
            cores = ((self.replayed or {}).get("machine") or {}).get("cores")
            if isinstance(cores, (int, float)) and not isinstance(cores, bool) and 0 < cores <= 65536:
                return float(cores)
        return float(this_machines_cores())

    # -- the cache file -----------------------------------------------------
    @property
    def machine(self) -> dict[str, Any]:
        if self._machine is None:
            self._machine = machine()
        return self._machine

    def cache_path(self) -> Path:
        return calibration_dir() / f"{machine_id(self.machine)}.json"

    def _read_cache(self, warn: bool) -> dict[str, Any]:
        path = self.cache_path()
        try:
            if path.stat().st_size > MAX_FILE_BYTES:
                raise ValueError("too large")
            doc = json.loads(path.read_text())
        except (FileNotFoundError, NotADirectoryError):  # nothing cached yet (the write says if it cannot be)
            return {}
        except (OSError, ValueError) as exc:
            if warn:
                _warn(f"the calibration cache {path} is unreadable ({type(exc).__name__}); measuring again")
            return {}
        if not isinstance(doc, dict) or doc.get("machine") != self.machine:
            if warn:
                _warn(f"the calibration cache {path} is not this machine's; measuring again")
            return {}
        return doc

    def _write_cache(self, kind: str, key: str, entry: dict[str, Any]) -> None:
        """Merge one entry into the file (re-read first: another process may have added some); atomic. A read-only
        or full disk only costs a measurement next time, and says so."""
        from zsgd.output.rundir import atomic_write_bytes

        doc = self._read_cache(warn=False)
        doc["machine"] = self.machine
        doc.setdefault(kind, {})
        if not isinstance(doc[kind], dict):
            doc[kind] = {}
        doc[kind][key] = entry
        path = self.cache_path()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(path, json.dumps(doc, indent=1).encode())
        except OSError as exc:
            _warn(f"cannot write the calibration cache {path} ({exc.strerror or exc}); the next run measures again")

    # -- figures ------------------------------------------------------------
    def get(self, kind: str, key: dict[str, Any], measure: Callable[[], dict[str, Any]], optional: bool = False) -> dict[str, Any] | None:
        """The figure of ``kind`` for ``key``: remembered, cached, replayed, or ``measure()``d now (and cached).
        ``optional``: a replayed record without it gives None (a figure added since that record was made: the run
        replays as that one did) instead of an error."""
        k = key_text(key)
        if (kind, k) in self._memory:
            return self._memory[(kind, k)]
        if self.mode == "replay":
            section = self.replayed.get(kind) if isinstance(self.replayed, dict) else None
            entry = section.get(k) if isinstance(section, dict) else None
            if entry is None and optional:
                return None
            if not valid_entry(kind, entry):
                what = {"compute": "gradient-step time", "server_step": "server-step time", "transport": "transport figure",
                        "broker_loop": "broker per-message cost"}[kind]
                held = len(section) if isinstance(section, dict) else 0
                raise ZsgdError(f"--calibration {self.source}: no valid {what} for {k} (it holds {held} of that kind); "
                                f"drop --calibration to use this machine's, or replay a file made for these flags")
            origin = "replayed"
        else:
            entry = None
            if self.mode == "cache":
                if self._cache is None:
                    self._cache = self._read_cache(warn=True)
                section = self._cache.get(kind)
                entry = section.get(k) if isinstance(section, dict) else None
                if entry is not None and not valid_entry(kind, entry):
                    _warn(f"the calibration cache {self.cache_path()} has a damaged {kind} entry; measuring it again")
                    entry = None
                elif entry is not None and _older(kind, entry):
                    entry = None
            origin = "cached"
            if entry is None:
                entry = dict(measure())
                if not valid_entry(kind, entry):
                    raise ZsgdError(f"the {kind} calibration measured nothing usable ({k}); give the figure by hand")
                entry |= {"measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "measured_ns": time.time_ns(),
                          "load": round(os.getloadavg()[0], 2)}
                self._write_cache(kind, k, entry)
                origin = "measured"
        self._memory[(kind, k)] = entry
        self.origins[(kind, k)] = origin
        return entry

    def record(self, wanted: Iterable[tuple[str, dict[str, Any]]] | None = None) -> dict[str, Any]:
        """The figures used (``wanted``: those of one arm; default: all this process used), for a ``config.yaml``,
        a ``calibration.json`` or a plan: what ``--calibration`` reads back."""
        keys = list(self._memory) if wanted is None else [(kind, key_text(key)) for kind, key in wanted]
        out: dict[str, Any] = {"source": self.source or self.mode,
                               "machine": (self.replayed or {}).get("machine") if self.mode == "replay" else self.machine}
        for kind, k in keys:
            if (kind, k) in self._memory:
                out.setdefault(kind, {})[k] = self._memory[(kind, k)]
        return out

    def summary(self) -> str | None:
        """One line for the terminal: where this process's figures came from (None: it used none)."""
        if not self.origins:
            return None
        counts = {o: sum(1 for v in self.origins.values() if v == o) for o in ("cached", "measured", "replayed")}
        if counts["replayed"]:
            return f"calibration: {counts['replayed']} figure(s) replayed from {self.source}"
        parts = [f"{n} {o}" for o, n in counts.items() if n]
        return (f"calibration: {', '.join(parts)} ({self.cache_path()}); the same command and seed give the same metrics; "
                f"--recalibrate measures again")


_current: Calibration | None = None


def current() -> Calibration:
    """This process's calibration: the one ``use`` set (the CLI, from its flags), else this machine's cache."""
    global _current
    if _current is None:
        _current = Calibration()
    return _current


def use(calibration: Calibration | None) -> Calibration | None:
    """Make ``calibration`` this process's (None: back to the default); returns the previous one."""
    global _current
    previous, _current = _current, calibration
    return previous


__all__ = ["Calibration", "KINDS", "calibration_dir", "current", "key_text", "machine", "machine_id", "read_record", "use",
           "valid_entry"]
