"""What the tests share: start zsgd (as processes or in-process), read what a run wrote, wait on conditions.

Import from here (``from helpers import ...``); ``conftest.py`` holds only the
pytest fixtures and hooks. Every wait has a deadline and polls a condition:
no test orders events by sleeping.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]

# Every process a test starts inherits this marker, so the orphan check sees
# only this session's processes, never another test run's on the same machine.
SESSION_MARK = f"ZSGD_TEST_SESSION={uuid.uuid4().hex}"
os.environ["ZSGD_TEST_SESSION"] = SESSION_MARK.split("=", 1)[1]


# -- zsgd as a process ----------------------------------------------------------

def zsgd_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "zsgd", *args]


def run_zsgd(*args: str, timeout: float = 240, check: bool = False, **kw) -> subprocess.CompletedProcess:
    """Run ``zsgd ARGS`` to the end; ``kw`` goes to subprocess.run (``cwd``, ``input``, ``env``)."""
    if "input" not in kw:
        kw.setdefault("stdin", subprocess.DEVNULL)
    proc = subprocess.run(zsgd_cmd(*args), capture_output=True, text=True, timeout=timeout, **kw)
    if check and proc.returncode != 0:
        raise AssertionError(f"zsgd {' '.join(args)} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    return proc


def start_zsgd(*args: str, session: bool = True, quiet: bool = False) -> subprocess.Popen:
    """Start ``zsgd ARGS`` in the background: its own session (so a test can signal the whole group), text
    pipes for stdout and stderr (``quiet``: both to /dev/null). Pair it with ``stop``."""
    out = subprocess.DEVNULL if quiet else subprocess.PIPE
    return subprocess.Popen(zsgd_cmd(*args), stdout=out, stderr=out, stdin=subprocess.DEVNULL, text=True, start_new_session=session)


def start_run(out: Path, *args: str) -> subprocess.Popen:
    """``zsgd run --out OUT ARGS`` in the background (see ``start_zsgd``)."""
    return start_zsgd("run", "--out", str(out), *args)


def start_worker(address: str, *args: str, keys: Path | None = None, **popen) -> subprocess.Popen:
    """A hand-started ``zsgd worker --connect ADDRESS ARGS`` (its output goes where ``popen`` says, default: ours);
    ``keys``: the run's keys folder (``RUN_DIR/keys``), whose secret a hand-started worker needs to be admitted."""
    popen.setdefault("stdin", subprocess.DEVNULL)
    extra = ["--keys-file", str(keys)] if keys is not None else []
    return subprocess.Popen(zsgd_cmd("worker", "--connect", address, *args, *extra), **popen)


def join_proof(run_dir: Path, role: str, worker: int, timeout: float = 60) -> dict[str, str]:
    """HELLO meta proving the run secret of the run in ``run_dir`` (a test's rogue that the run admits, to see
    what an admitted but hostile peer can do)."""
    from zsgd.wire.auth import hello_proof

    path = Path(run_dir) / "keys" / "run.json"
    wait_for(lambda: path.exists() and path.stat().st_size > 0, timeout, what=f"{path}")
    return {"proof": hello_proof(json.loads(path.read_text())["token"], role, worker)}


def stop(*procs: subprocess.Popen | None, group: bool = False) -> None:
    """Kill whatever of ``procs`` is still running (``group``: its whole process group) and reap it."""
    for proc in procs:
        if proc is None:
            continue
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL) if group else proc.kill()
            except ProcessLookupError:
                pass
        try:
            proc.communicate(timeout=20)
        except (subprocess.TimeoutExpired, ValueError):
            pass


def reap(*procs: subprocess.Popen, timeout: float = 20) -> None:
    """Give each of ``procs`` ``timeout`` seconds to exit by itself, then kill it."""
    for proc in procs:
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# -- zsgd in-process --------------------------------------------------------------

def cli(*args: str, **kw):
    """``zsgd ARGS`` in this process through click's CliRunner: ``result.exit_code``, ``.stdout``, ``.stderr``.

    The group turns every error into one ``zsgd: error: ...`` line on stderr and exit code 2, as the real
    entry point does (click >= 8.2 keeps stderr apart from stdout)."""
    from click.testing import CliRunner

    from zsgd.cli import main

    return CliRunner().invoke(main, list(args), **kw)


def lines_of(text: str) -> list[str]:
    """The non-blank lines of ``text``."""
    return [line for line in text.splitlines() if line.strip()]


# -- what a run wrote ---------------------------------------------------------------

_READ: dict[Path, tuple[tuple, int, list[dict]]] = {}  # path -> (which file, bytes parsed, events so far); a few runs' worth


def read_events(run_dir: Path) -> list[dict]:
    """The events of a run that may still be writing: a half-written last line is skipped.

    Tests poll this while a run writes thousands of events; each call parses only the lines added
    since the last one (a file replaced, truncated or rewritten, as on --resume, is read again from
    the start), so the waiting test does not take a core from the run it waits on."""
    path = Path(run_dir) / "metrics.jsonl"
    try:
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            head = f.read(256)  # with the inode, tells this file from an earlier one at the same path
            ident = (st.st_dev, st.st_ino, head)
            cached_ident, offset, events = _READ.get(path, (None, 0, []))
            if cached_ident is None or cached_ident[:2] != ident[:2] or not head.startswith(cached_ident[2]) or st.st_size < offset:
                offset, events = 0, []
            f.seek(offset)
            data = f.read()
    except FileNotFoundError:
        return []
    complete = data.rfind(b"\n") + 1  # the lines written so far; a last line without its newline may be half-written
    events = events + _parse_lines(data[:complete])
    if len(_READ) > 8:
        _READ.clear()
    _READ[path] = (ident, offset + complete, events)
    return events + _parse_lines(data[complete:])


def _parse_lines(data: bytes) -> list[dict]:
    out = []
    for line in data.decode(errors="replace").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return out


def events(run_dir: Path, kind: str | None = None) -> list[dict]:
    """The events of a finished run (every line must parse), all or those of one ``kind``."""
    evs = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [e for e in evs if kind is None or e["event"] == kind]


def summary_of(run_dir: Path) -> dict:
    """``summary.json``, which must be strict JSON (no NaN or Infinity)."""
    def not_strict(constant: str):
        raise AssertionError(f"{run_dir}/summary.json holds {constant}: not strict JSON")

    return json.loads((Path(run_dir) / "summary.json").read_text(), parse_constant=not_strict)


def worker_pids(run_dir: Path) -> dict[int, int]:
    """Worker id -> pid of every worker that has joined so far."""
    return {e["worker"]: e["pid"] for e in read_events(run_dir) if e["event"] == "worker" and e.get("role") == "worker" and e.get("pid")}


def start_event(run_dir: Path, timeout: float = 60) -> dict:
    """Wait for the broker's ``start`` event (it carries the address workers connect to)."""
    return wait_for(lambda: next((e for e in read_events(run_dir) if e["event"] == "start"), None), timeout, what="the broker to start")


def broker_address(run_dir: Path, timeout: float = 60) -> str:
    return start_event(run_dir, timeout)["address"]


def wait_for_workers(run_dir: Path, n: int, timeout: float = 60) -> dict[int, int]:
    """Wait until ``n`` workers have joined; their pids by worker id."""
    return wait_for(lambda: (p := worker_pids(run_dir)) and len(p) == n and p, timeout, what=f"{n} workers to join")


def wait_for_updates(run_dir: Path, n: int = 1, timeout: float = 60) -> None:
    """Wait until the run has applied ``n`` updates (rounds, in a decentralized run)."""
    wait_for(lambda: any(e["event"] == "update" and e["updates"] >= n for e in read_events(run_dir)), timeout, what=f"{n} updates")


# -- waiting and processes ------------------------------------------------------------

def wait_for(predicate, timeout: float, interval: float = 0.1, what: str = "condition"):
    """Poll ``predicate`` until it returns something true (returned) or ``timeout`` seconds pass (AssertionError)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            break
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie is not alive for our purposes
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def port_free(port: int, host: str = "127.0.0.1") -> bool:
    s = socket.socket()
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((host, port))
        return True
    except OSError:
        return False
    finally:
        s.close()


def zsgd_processes() -> set[int]:
    """PIDs of live 'python -m zsgd' processes of this test session (not this test process)."""
    pids = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"-m" in cmd and b"zsgd" in cmd and int(entry.name) != os.getpid() and pid_alive(int(entry.name)):
            try:
                if SESSION_MARK.encode() not in (entry / "environ").read_bytes().split(b"\0"):
                    continue
            except OSError:
                continue
            pids.add(int(entry.name))
    return pids


# -- the sans-IO rules by hand ----------------------------------------------------------

class PlainSGD:
    """``w -= lr * g`` in place, remembering the rate of every call: the optimizer the server rules are tested with."""

    def __init__(self, lr: float = 0.1) -> None:
        self.lr = lr
        self.calls: list[float] = []

    def step(self, w, g, lr=None):
        lr = self.lr if lr is None else lr
        self.calls.append(lr)
        w -= np.float32(lr) * g


def ups(outputs, kind):
    """The outputs of a server rule that are of ``kind`` (Applied, Reply, Dropped, ...)."""
    return [o for o in outputs if isinstance(o, kind)]


def refused(*args, match: str, code: int = 2, seconds: float = 20.0) -> str:
    """Run ``zsgd ARGS`` in-process; assert one short ``zsgd: error:`` line matching ``match``, exit ``code``, no
    traceback, and an answer within ``seconds`` (a generous bound: a refusal must not start the work first)."""
    import re

    t0 = time.monotonic()
    result = cli(*[str(a) for a in args])
    took = time.monotonic() - t0
    lines = lines_of(result.stderr)
    assert result.exit_code == code, (result.exit_code, result.output, result.exception)
    assert not isinstance(result.exception, Exception) or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    assert len(lines) == 1 and lines[0].startswith("zsgd: error: "), result.stderr
    assert re.search(match, lines[0]), lines[0]
    assert len(lines[0]) < 600, lines[0]
    assert took < seconds, f"took {took:.1f} s"
    return lines[0]
