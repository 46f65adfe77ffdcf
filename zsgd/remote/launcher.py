"""Workers on other machines: planning a run over SSH, and the worker's end of the SSH channel.

``zsgd run --remote ssh_hosts.txt`` goes through four steps, each of which
fails with a one-line message naming the host, the cause and the fix:

1. *probe* every host in parallel (one ssh call each): can we log in, which
   Python, is zsgd installed (``zsgd remote init`` made a venv, or
   ``python=`` in the hosts file has it);
2. pick the address workers connect back to (``--advertise``, else the
   local address on the route to the hosts) and bind the broker there;
3. check, from every host, that the broker's port is reachable (a firewall
   otherwise shows up only as workers silently timing out);
4. start ``slots`` workers per host: the ``ssh`` launcher
   (``zsgd.runtime.launch.ssh``), with this run's keys on the SSH channel's
   stdin.

A remote worker runs with ``--watch-stdin`` (``exit_when_stdin_closes``
here): it leaves when its ssh session's stdin closes, so no worker outlives
its run.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from dataclasses import dataclass, field

from zsgd import __version__
from zsgd.errors import ZsgdError
from zsgd.remote.hosts import Host, load_hosts
from zsgd.remote.ssh import HostError, Probe, SshOptions, parallel, probe_host

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
