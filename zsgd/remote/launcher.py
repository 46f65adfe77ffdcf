"""Workers on other machines, started and stopped over SSH.

``zsgd run --remote ssh_hosts.txt`` goes through four steps, each of which
fails with a one-line message naming the host, the cause and the fix:

1. *probe* every host in parallel (one ssh call each): can we log in, which
   Python, is zsgd installed (``zsgd remote init`` made a venv, or
   ``python=`` in the hosts file has it);
2. pick the address workers connect back to (``--advertise``, else the
   local address on the route to the hosts) and bind the broker there;
3. check, from every host, that the broker's port is reachable (a firewall
   otherwise shows up only as workers silently timing out);
4. start ``slots`` workers per host, one ``ssh`` each, with this run's keys
   on the SSH channel's stdin.

No orphans: each remote worker runs with ``--watch-stdin`` -- it exits when
its ssh session's stdin closes, which happens whenever the local ``ssh``
process ends for any reason (normal end, Ctrl-C, ``kill -9`` of the run, a
dropped network link noticed by ssh keep-alives). Every local ``ssh`` dies
with the run (parent-death signal). As a last resort ``stop_all`` sends
``pkill -f`` for this run's marker to any host whose workers did not leave
cleanly.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import socket
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from zsgd import __version__
from zsgd.errors import ZsgdError
from zsgd.remote.hosts import Host, load_hosts
from zsgd.runtime.launch.forked import die_with_parent
from zsgd.runtime.launch.base import LaunchContext, Rank
from zsgd.runtime.launch.local import SINGLE_THREAD_ENV, Child, close_stdin, send_line
from zsgd.remote.ssh import HostError, Probe, SshOptions, parallel, probe_host, python_sh

WILDCARDS = ("0.0.0.0", "::", "*", "")
STDIN_GRACE_S = 5.0  # after stdin closes, a worker gets this long to leave politely before it is ended


# -- the plan -----------------------------------------------------------------------------
@dataclass
class RemotePlan:
    """Hosts that passed the probe, where their workers go, and the broker's addresses."""

    path: str
    ssh: SshOptions
    hosts: list[Host]
    probes: dict[str, Probe]
    skipped: list[Probe] = field(default_factory=list)
    advertise: str = "127.0.0.1"
    bind_host: str = "127.0.0.1"
    first_id: int = 0

    @property
    def n_workers(self) -> int:
        return sum(h.slots for h in self.hosts)

    @property
    def n_servers(self) -> int:
        """Range servers the hosts file places (``servers=N``); the others run on this machine."""
        return sum(h.servers for h in self.hosts)

    def server_placement(self) -> dict[int, Host]:
        """Range-server index -> host: indices from 1 (range 0 is the coordinator's), in file order."""
        out, index = {}, 1
        for h in self.hosts:
            for _ in range(h.servers):
                out[index] = h
                index += 1
        return out

    def placement(self) -> dict[int, Host]:
        """Worker id -> host: local workers take the first ids, then each host its ``slots`` ids in file order."""
        out, wid = {}, self.first_id
        for h in self.hosts:
            for _ in range(h.slots):
                out[wid] = h
                wid += 1
        return out


def prepare_remote(path: str, ssh: SshOptions, first_id: int, allow_partial: bool = False, advertise: str | None = None,
                   host_flag: str | None = None, show: bool = True) -> RemotePlan | None:
    """Parse the hosts file, probe every host, choose the broker's addresses; raise on an unusable host.

    With ``allow_partial`` and local workers (``first_id`` > 0, the ids they take), no usable host at all is
    a warning and None: the run goes on with its local workers."""
    from zsgd.output.live import stderr_console

    hosts = load_hosts(path)
    probes = parallel(lambda h: probe_host(ssh, h), hosts)
    for p in probes:
        if p.ok and not p.zsgd:
            p.ok = False
            p.reason = (f"zsgd is not installed for {p.executable} (Python {p.python}); run 'zsgd remote init {path}' "
                        f"or set python= on {p.host.where} to an interpreter that has it")
    bad = [p for p in probes if not p.ok]
    if bad and not allow_partial:
        hint = " (or pass --allow-partial to skip unusable hosts)" if len(hosts) > 1 else ""
        raise HostError(bad[0].host, bad[0].reason + hint)
    for p in bad:
        stderr_console.print(f"[yellow]skipping {p.host.label}[/]: {p.reason}")
    good = [p for p in probes if p.ok]
    if not good:
        if allow_partial and first_id > 0:
            stderr_console.print(f"[yellow]warning[/]: no host in {path} is usable; going on with the {first_id} local "
                                 f"worker{'s' if first_id != 1 else ''} (--allow-partial)")
            return None
        raise HostError(bad[0].host, f"{bad[0].reason} -- and no other host in {path} is usable")
    for p in good:
        if p.zsgd != __version__:
            stderr_console.print(f"[yellow]warning[/]: {p.host.label} has zsgd {p.zsgd}, this machine {__version__}; "
                                 f"update it with 'zsgd remote init {path}'")
    plan = RemotePlan(path, ssh, [p.host for p in good], {p.host.label: p for p in good}, bad, first_id=first_id)
    plan.bind_host, plan.advertise = choose_addresses(plan.hosts, ssh, advertise, host_flag)
    if show:
        print_plan(plan)
    return plan


def choose_addresses(hosts: list[Host], ssh: SshOptions, advertise: str | None, host_flag: str | None) -> tuple[str, str]:
    """(address the broker binds, address workers connect to).

    ``--advertise`` wins; else a specific ``--host``; else the local address
    of the route to the first host (what the host sees as our address when
    there is no NAT or jump host in between)."""
    if advertise:
        adv = advertise.strip("[]")
    elif host_flag and host_flag not in WILDCARDS:
        adv = host_flag
    else:
        adv = route_source(hosts, ssh)
    bind = host_flag if host_flag else adv
    if bind not in WILDCARDS:
        bind = _as_ip(bind, "--host" if host_flag else "--advertise")
    return bind, adv


def _as_ip(name: str, flag: str) -> str:
    import ipaddress

    try:
        return str(ipaddress.ip_address(name.strip("[]")))
    except ValueError:
        pass
    try:
        return socket.getaddrinfo(name, None, type=socket.SOCK_STREAM)[0][4][0]
    except (socket.gaierror, IndexError):
        raise ZsgdError(f"{flag} {name}: not an address of this machine (give an IP address)") from None


def route_source(hosts: list[Host], ssh: SshOptions) -> str:
    """The local address used to reach the hosts (UDP connect: no packet is sent)."""
    found: dict[str, list[str]] = {}
    for h in hosts:
        target = ssh.resolve(h).get("hostname", h.host)
        try:
            info = socket.getaddrinfo(target, 22, type=socket.SOCK_DGRAM)[0]
            with socket.socket(info[0], socket.SOCK_DGRAM) as s:
                s.connect(info[4])
                found.setdefault(s.getsockname()[0], []).append(h.label)
        except OSError:
            raise ZsgdError(f"{h.label}: cannot work out which address it reaches this machine on ({target} does not resolve here, "
                            f"e.g. behind a jump host); pass --advertise ADDRESS") from None
    addrs = list(found)
    if len(addrs) > 1:
        from zsgd.output.live import stderr_console

        stderr_console.print(f"[yellow]note[/]: hosts reach this machine on different addresses ({', '.join(addrs)}); using {addrs[0]}. "
                             "Pass --advertise to choose another.")
    return addrs[0]


def print_plan(plan: RemotePlan) -> None:
    from rich.table import Table

    from zsgd.output.live import stderr_console

    table = Table(title=f"remote hosts ({plan.path})", show_edge=False, header_style="bold")
    for col in ("host", "workers", "python", "zsgd", "ssh"):
        table.add_column(col)
    placement = plan.placement()
    for h in plan.hosts:
        p = plan.probes[h.label]
        ids = [w for w, hh in placement.items() if hh is h]
        table.add_row(h.label, f"{ids[0]}-{ids[-1]}" if len(ids) > 1 else str(ids[0]), f"{p.python} ({'venv' if p.venv else p.executable})",
                      str(p.zsgd), f"{p.seconds:.1f} s")
    for p in plan.skipped:
        table.add_row(f"[red]{p.host.label}[/]", "-", "-", "-", "[red]skipped[/]")
    stderr_console.print(table)


def check_reach(plan: RemotePlan, port: int, timeout: float = 5.0) -> None:
    """From every host, open a TCP connection to the broker: catches firewalls and a wrong --advertise up front."""
    target = f"{plan.advertise}:{port}"
    probes = parallel(lambda h: probe_host(plan.ssh, h, reach=target, reach_timeout=timeout), plan.hosts)
    for p in probes:
        if not p.ok:
            raise HostError(p.host, p.reason)
        if p.reach != "ok":
            raise HostError(p.host, f"cannot reach the broker at {target} ({p.reach}): open port {port} to this host in the "
                                    f"firewall, or pass --advertise with an address the host can reach (see README, 'Remote workers')")


# -- launching ------------------------------------------------------------------------------
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


# -- the worker's side ------------------------------------------------------------------------
def exit_when_stdin_closes(grace: float = STDIN_GRACE_S) -> None:
    """Worker side of ``--watch-stdin``: leave when stdin closes (the ssh session ended).

    SIGTERM first, which the worker turns into a polite LEAVE; if it has not
    exited ``grace`` seconds later, end the process outright."""

    def watch() -> None:
        try:
            while os.read(0, 65536):
                pass
        except OSError:
            pass
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(grace)
        os._exit(137)

    threading.Thread(target=watch, name="zsgd-stdin-watch", daemon=True).start()


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
