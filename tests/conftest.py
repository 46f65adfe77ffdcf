"""Shared fixtures: real processes, real sockets, and checks that nothing is left behind."""

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

import pytest
from hypothesis import settings

REPO = Path(__file__).resolve().parents[1]

# Property tests draw the same examples on every run by default, so CI cannot fail
# on a draw nobody saw before; ZSGD_HYPOTHESIS=explore draws fresh ones (do that
# when changing a tested module, and pin what it finds as an explicit case).
settings.register_profile("repeatable", derandomize=True, print_blob=True)
settings.register_profile("explore", derandomize=False, print_blob=True)
settings.load_profile(os.environ.get("ZSGD_HYPOTHESIS", "repeatable"))
# Every process a test starts inherits this marker, so the orphan check sees
# only this session's processes, never another test run's on the same machine.
SESSION_MARK = f"ZSGD_TEST_SESSION={uuid.uuid4().hex}"
os.environ["ZSGD_TEST_SESSION"] = SESSION_MARK.split("=", 1)[1]


def zsgd_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "zsgd", *args]


def run_zsgd(*args: str, timeout: float = 240, check: bool = False) -> subprocess.CompletedProcess:
    proc = subprocess.run(zsgd_cmd(*args), capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    if check and proc.returncode != 0:
        raise AssertionError(f"zsgd {' '.join(args)} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    return proc


def read_events(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    events = []
    for line in path.read_text().splitlines():
        try:
            events.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return events


def wait_for(predicate, timeout: float, interval: float = 0.1, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
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
    """PIDs of live 'python -m zsgd' processes (not this test process)."""
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


@pytest.fixture
def no_orphans():
    """Fail the test if it leaves any zsgd process running; kill them so later tests are clean."""
    before = zsgd_processes()
    yield
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and zsgd_processes() - before:
        time.sleep(0.2)
    left = zsgd_processes() - before
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert not left, f"stray zsgd processes left running: {sorted(left)}"
