"""Starting and stopping worker processes on this machine.

Local workers run the very command remote ones run
(``python -m zsgd worker --connect ...``), so a local run exercises the
same code path as a cluster; on Linux they are forked from this warmed-up
process rather than started as new interpreters (``zsgd.runtime.launch.forked``). Each child gets its own session (a Ctrl-C in
the terminal reaches only the broker, which then tears down in order), one
BLAS thread (parallelism comes from processes), a log file in the run
directory, and on Linux a parent-death signal, so even a ``kill -9`` of
the broker leaves no orphan computing forever.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from zsgd.runtime.launch.base import LOCAL, LaunchContext, Rank, failed_child
from zsgd.runtime.launch.forked import die_with_parent, fork_available, fork_command, warm_kernels
from zsgd.runtime.threads import SINGLE_THREAD_ENV


WORKERS_PER_CPU = 8  # oversubscription still useful for staleness studies; beyond it workers only time-share
MIN_WORKER_CAP = 16
WORKER_MEMORY = 300 << 20  # a worker process: interpreter, numpy/numba, its copy of the data set
#: A range server of --servers K steps its range for every update of every worker: it is busy, not waiting,
#: so beyond two per CPU servers only time-share (--servers 1000 on 2 CPUs made no update in a minute).
SERVERS_PER_CPU = 2
LOG_TAIL_BYTES = 64 << 10
MIN_SERVER_CAP = 4


def max_local_workers() -> tuple[int, str]:
    """(most local worker processes this machine can run, why): CPUs and available memory."""
    return _machine_cap(WORKERS_PER_CPU, MIN_WORKER_CAP, "worker")


def max_local_servers() -> tuple[int, str]:
    """(most range-server processes of --servers K this machine can run besides its workers, why)."""
    return _machine_cap(SERVERS_PER_CPU, MIN_SERVER_CAP, "server")


def _machine_cap(per_cpu: int, minimum: int, what: str) -> tuple[int, str]:
    from zsgd.core.machine import available_memory, cpu_count

    cpus = cpu_count()
    limit, why = max(minimum, per_cpu * cpus), f"{cpus} CPU{'s' if cpus != 1 else ''}"
    avail = available_memory()
    if avail is not None and max(1, avail // WORKER_MEMORY) < limit:
        return max(1, avail // WORKER_MEMORY), f"{avail / 2**30:.1f} GiB of available memory at ~{WORKER_MEMORY >> 20} MiB a {what}"
    return limit, why


@dataclass
class Child:
    name: str
    proc: Any  # subprocess.Popen, or a ForkedProcess (the same poll/wait/send_signal/kill/pid/stdin)
    log_path: Path
    started: float = field(default_factory=time.monotonic)

    @property
    def returncode(self) -> int | None:
        return self.proc.poll()

    def log_tail(self, n: int = 5) -> str:
        """The last ``n`` lines of the child's log as one line, for the run's one-line error.

        A traceback is cut to its last line (what was raised): its frames are code and carets that say nothing
        to the user and made the run's error a page long. Only the log's last 64 KiB is read, each line cut short.
        """
        try:
            with open(self.log_path, "rb") as f:
                f.seek(max(0, f.seek(0, os.SEEK_END) - LOG_TAIL_BYTES))
                lines = [line.strip() for line in f.read().decode(errors="replace").splitlines() if line.strip()]
        except OSError:
            return ""
        first = next((i for i, line in enumerate(lines) if line.startswith("Traceback (most recent call last)")), None)
        if first is not None:
            lines = lines[:first] + lines[-1:]
        return " | ".join(line if len(line) <= 200 else line[:197] + "..." for line in lines[-n:])


class LocalLauncher:
    """Processes on this machine, forked or exec'd (``zsgd.runtime.launch.base`` has the shape every launcher shares)."""

    name = LOCAL

    def __init__(self, address: str, log_dir: Path, heartbeat: float, timeout: float, python: str = sys.executable,
                 model: str | None = None, warm: Callable[[], None] | None = None) -> None:
        self.address = address
        self.warm = warm  # loads the kernels the children will need, once, before the first fork (forked.warm_kernels)
        self.model = model  # a user model's spec: the worker is started for it (zsgd.runtime.launch.access.user_model_flag)
        self.log_dir = Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.heartbeat = heartbeat
        self.timeout = timeout
        self.python = python
        self.children: list[Child] = []

    def command(self, worker_id: int, role: str = "worker") -> list[str]:
        return [self.python, "-m", "zsgd", "worker", "--connect", self.address, "--id", str(worker_id), "--role", role,
                "--heartbeat", f"{self.heartbeat:g}", "--timeout", f"{self.timeout:g}", *(["--model", self.model] if self.model else [])]

    stdin_pipe = False  # a pipe on the child's stdin, for hand_over()

    def start(self, ranks: list[Rank]) -> None:
        for rank in ranks:
            self.start_one(rank.id, rank.role)

    def lost(self) -> str | None:
        return None  # a local process that died is a dead worker: the broker notices, the run goes on

    def failed(self) -> str | None:
        return failed_child(self.children)

    def start_one(self, worker_id: int, role: str = "worker") -> Child:
        name = f"{role}-{worker_id}"
        log_path = self.log_dir / f"{name}.log"
        proc = self.spawn(self.command(worker_id, role), log_path, name, stdin_pipe=self.stdin_pipe)
        self.hand_over(proc, worker_id, role)
        child = Child(name, proc, log_path)
        self.children.append(child)
        return child

    def hand_over(self, proc: Any, worker_id: int, role: str) -> None:
        """What a started child gets on its stdin pipe (nothing here; CURVE keys in a secure run)."""

    def spawn(self, command: list[str], log_path: Path, name: str, stdin_pipe: bool = False) -> Any:
        """Start ``command`` (``python -m zsgd ...``) in its own session with its output on ``log_path``:
        forked from this warmed-up process where that is safe (``zsgd.runtime.launch.forked``), else exec'd."""
        if command[1:3] == ["-m", "zsgd"] and command[0] == sys.executable and fork_available():
            if self.warm is not None:
                warm, self.warm = self.warm, None
                warm()
            return fork_command(command[3:], log_path, title=f"zsgd {name}", stdin_pipe=stdin_pipe)
        env = os.environ | SINGLE_THREAD_ENV | {"PYTHONUNBUFFERED": "1"}
        with open(log_path, "ab") as log:
            return subprocess.Popen(command, stdin=subprocess.PIPE if stdin_pipe else subprocess.DEVNULL, stdout=log,
                                    stderr=subprocess.STDOUT, env=env, start_new_session=True, preexec_fn=die_with_parent)

    def running(self) -> list[Child]:
        return [c for c in self.children if c.returncode is None]

    def stop_all(self, grace: float = 5.0) -> None:
        """Wait ``grace`` s for children to leave on their own (the broker said
        LEAVE), then SIGTERM, then SIGKILL; reap everything."""
        deadline = time.monotonic() + grace
        while self.running() and time.monotonic() < deadline:
            time.sleep(0.05)
        for c in self.running():
            try:
                c.proc.send_signal(signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 3.0
        for c in self.children:
            try:
                c.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                c.proc.kill()
                c.proc.wait(timeout=5)


def send_line(proc: Any, obj: dict) -> None:
    """One JSON line on a child's stdin pipe (its keys); a child that already died is left to its log."""
    try:
        proc.stdin.write(json.dumps(obj).encode() + b"\n")
        proc.stdin.flush()
    except (BrokenPipeError, OSError):
        pass  # the process already died; its log says why


def close_stdin(c: Child) -> None:
    if c.proc.stdin is not None and not c.proc.stdin.closed:
        try:
            c.proc.stdin.close()
        except OSError:
            pass


class KeyedLocalLauncher(LocalLauncher):
    """Local processes of a run: their keys (CURVE, or the run secret) on a stdin pipe, which also ties them to this process."""

    def __init__(self, *args, keys, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.keys = keys

    def command(self, worker_id: int, role: str = "worker") -> list[str]:
        return [*super().command(worker_id, role), "--keys-stdin", "--watch-stdin"]

    stdin_pipe = True

    def hand_over(self, proc: Any, worker_id: int, role: str) -> None:
        send_line(proc, self.keys.bundle(f"worker-{worker_id}" if role == "worker" else f"{role}-{worker_id}"))

    def stop_all(self, grace: float = 5.0) -> None:
        super().stop_all(grace)
        for c in self.children:
            close_stdin(c)


def make_local(ctx: LaunchContext) -> KeyedLocalLauncher:
    """The local launcher of a run (registered as ``local``): every run has one, for its evaluator at least."""
    access = ctx.access
    return KeyedLocalLauncher(access.local_address(ctx.broker.address), ctx.run_dir / "logs", ctx.heartbeat, ctx.timeout,
                              keys=access.keys, model=ctx.model,
                              warm=lambda: warm_kernels(ctx.broker.problem, ctx.broker.cfg.model))
