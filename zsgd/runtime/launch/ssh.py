"""Workers on other machines, started and stopped over SSH: the ``ssh`` launcher.

``zsgd.remote.launcher`` plans (probes the hosts of the hosts file, chooses
the addresses, checks the broker's port from every host); this starts
``slots`` workers per host, one ``ssh`` each, with this run's keys on the
SSH channel's stdin, and stops them.

No orphans: each remote worker runs with ``--watch-stdin`` -- it exits when
its ssh session's stdin closes, which happens whenever the local ``ssh``
process ends for any reason (normal end, Ctrl-C, ``kill -9`` of the run, a
dropped network link noticed by ssh keep-alives). Every local ``ssh`` dies
with the run (parent-death signal). As a last resort ``stop_all`` sends
``pkill -f`` for this run's marker to any host whose workers did not leave
cleanly.
"""

from __future__ import annotations

import shlex
import signal
import subprocess
import time
from pathlib import Path

from zsgd.errors import ZsgdError
from zsgd.remote.hosts import Host
from zsgd.remote.launcher import STDIN_GRACE_S, RemotePlan, check_reach
from zsgd.remote.ssh import parallel, python_sh
from zsgd.runtime.launch.base import LaunchContext, Rank, failed_child
from zsgd.runtime.launch.forked import die_with_parent
from zsgd.runtime.launch.local import SINGLE_THREAD_ENV, Child, close_stdin, send_line


def run_marker(run_id: str) -> str:
    return f"zsgd-run-{run_id}"


class RemoteLauncher:
    """Start and stop workers (and placed range servers) over SSH (``zsgd.runtime.launch.base``: the shape every launcher shares)."""

    name = "ssh"

    def __init__(self, plan: RemotePlan, address: str, log_dir: Path, heartbeat: float, timeout: float, run_id: str,
                 keys=None, join_timeout: float = 60.0, model: str | None = None) -> None:
        self.plan = plan
        self.model = model  # a user model's spec: the workers are started for it
        self.address = address
        self.log_dir = Path(log_dir)
        self.heartbeat, self.timeout, self.join_timeout = heartbeat, timeout, join_timeout
        self.keys = keys  # zsgd.wire.security.RunKeys or None
        self.marker = run_marker(run_id)
        self.hosts = plan.placement()
        self.server_hosts = plan.server_placement()
        self.children: list[Child] = []
        self._host_of: dict[int, Host] = {}  # id(child) -> host
        self._forced: set[int] = set()

    def command(self, worker_id: int, role: str, host: Host) -> str:
        args = ["-m", "zsgd", "worker", "--connect", self.address, "--id", str(worker_id), "--role", role,
                "--heartbeat", f"{self.heartbeat:g}", "--timeout", f"{self.timeout:g}", "--join-timeout", f"{self.join_timeout:g}",
                "--watch-stdin", "--host-label", host.label, "--tag", self.marker]
        if self.keys is not None:
            args.append("--keys-stdin")
        if self.model:
            args += ["--model", self.model]
        if role == "server":
            args += ["--advertise", host.host]  # a range server listens on the host's own address
        env = " ".join(f"{k}={v}" for k, v in (SINGLE_THREAD_ENV | {"PYTHONUNBUFFERED": "1"}).items())
        return (f"{python_sh(host, self.plan.ssh.remote_dir)}; "
                f'command -v "$PY" >/dev/null 2>&1 || {{ echo "zsgd: no Python at $PY on this host; run zsgd remote init" >&2; exit 127; }}; '
                f'export {env}; exec "$PY" ' + " ".join(shlex.quote(a) for a in args))

    def start(self, ranks: list[Rank]) -> None:
        for rank in ranks:
            self.start_one(rank.id, rank.role)

    def lost(self) -> str | None:
        return None  # a remote worker that died is a dead worker: the broker notices, the run goes on

    def failed(self) -> str | None:
        return failed_child(self.children)

    def start_one(self, worker_id: int, role: str = "worker") -> Child:
        host = (self.server_hosts if role == "server" else self.hosts).get(worker_id)
        if host is None:
            raise ZsgdError(f"{role} {worker_id} is not placed on any remote host")
        name = f"{role}-{worker_id}@{host.label}"
        log_dir = self.log_dir / host.safe_label()
        log_dir.mkdir(parents=True, exist_ok=True)
        log_path = log_dir / f"{role}-{worker_id}.log"
        argv = self.plan.ssh.argv(host, self.command(worker_id, role, host), stdin=True)
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                    preexec_fn=die_with_parent)
        if self.keys is not None:
            send_line(proc, self.keys.bundle(f"worker-{worker_id}" if role == "worker" else f"{role}-{worker_id}"))
        child = Child(name, proc, log_path)
        self.children.append(child)
        self._host_of[id(child)] = host
        return child

    def running(self) -> list[Child]:
        return [c for c in self.children if c.returncode is None]

    def stop_all(self, grace: float = 5.0) -> None:
        """Wait for workers to leave (the broker said LEAVE); then close their stdin (the
        remote watchdog ends them); then end ssh; finally sweep hosts whose workers did
        not exit cleanly with ``pkill -f`` of this run's marker."""
        _wait(self.running, grace)
        for c in self.running():
            close_stdin(c)
        _wait(self.running, STDIN_GRACE_S + 1)
        for c in self.running():
            self._forced.add(id(c))
            _signal(c, signal.SIGTERM)
        _wait(self.running, 2.0)
        for c in self.running():
            _signal(c, signal.SIGKILL)
            c.proc.wait(timeout=5)
        for c in self.children:
            close_stdin(c)
            c.proc.poll()
        dirty = {self._host_of[id(c)].label: self._host_of[id(c)] for c in self.children
                 if id(c) in self._forced or c.returncode in (255, None) or (c.returncode or 0) < 0}
        if dirty:
            self.sweep(list(dirty.values()))

    def sweep(self, hosts: list[Host]) -> None:
        """Last resort: end any process of this run still alive on ``hosts``."""
        pattern = shlex.quote(f"zsgd-run-[{self.marker[9]}]{self.marker[10:]}")  # the [x] keeps pkill from matching this shell
        script = f"if pkill -TERM -f {pattern}; then sleep 2; pkill -KILL -f {pattern}; fi; exit 0"
        parallel(lambda h: self.plan.ssh.run(h, script, timeout=self.plan.ssh.connect_timeout + 10), hosts)


def _signal(c: Child, sig: int) -> None:
    try:
        c.proc.send_signal(sig)
    except ProcessLookupError:
        pass


def _wait(running, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while running() and time.monotonic() < deadline:
        time.sleep(0.05)


def make_remote(ctx: LaunchContext) -> RemoteLauncher | None:
    """The SSH launcher of a run with ``--remote HOSTS`` (registered as ``ssh``): checks the broker's port from every
    host first; None without a hosts file."""
    access = ctx.access
    if access.plan is None:
        return None
    from zsgd.output.live import stderr_console

    address = access.remote_address(ctx.broker.address)
    # Printed even with --quiet: the one address a user must know to debug a firewall.
    stderr_console.print(f"remote workers connect to [bold]{address}[/]" + (" (CURVE)" if access.secure else ""))
    if ctx.broker.endpoint.guard is not None:
        ctx.broker.endpoint.guard.expect_probes(len(access.plan.hosts))  # not refused clients
    check_reach(access.plan, int(address.rsplit(":", 1)[1]))
    return RemoteLauncher(access.plan, address, ctx.run_dir / "logs" / "hosts", ctx.heartbeat, ctx.timeout, ctx.broker.run,
                          keys=access.keys, model=ctx.model)
