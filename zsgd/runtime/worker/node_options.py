"""What a worker or evaluator process is told at start, and how it speaks.

Shared by the centralized worker (``zsgd.node``) and the decentralized node
loop, which must not import each other.
"""

from __future__ import annotations

import os
import socket
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from zsgd.errors import ZsgdError
from zsgd.wire import protocol
from zsgd.wire.shm import enabled_by_default


#: Liveness bounds of --heartbeat and --timeout, for the broker's side and the worker's alike: a heartbeat
#: faster than 10 ms is a flood of messages, and a peer silent for more than an hour is dead to anyone watching.
MIN_HEARTBEAT = 0.01
MAX_TIMEOUT = 3600.0
MAX_JOIN_TIMEOUT = 86_400.0  # --join-timeout: a worker started before its broker waits at most a day


def check_liveness(heartbeat: float, timeout: float) -> None:
    """ZsgdError unless ``MIN_HEARTBEAT <= heartbeat < timeout <= MAX_TIMEOUT`` (finite numbers of seconds)."""
    from zsgd.core.config import check_seconds
    from zsgd.wire.link import check_intervals

    check_intervals(heartbeat, timeout)
    check_seconds("--timeout", timeout, MAX_TIMEOUT, positive=True)
    if heartbeat < MIN_HEARTBEAT:
        raise ZsgdError(f"--heartbeat must be at least {MIN_HEARTBEAT:g} s (more often is a flood of messages), got {heartbeat!r}")


@dataclass
class NodeOptions:
    connect: str
    worker_id: int | None = None
    role: str = "worker"  # or "evaluator", or "server" (a range server of --servers K)
    heartbeat: float = 1.0
    timeout: float = 10.0
    join_timeout: float = 60.0
    data_dir: str | None = None
    curve: dict | None = None
    token: str | None = None  # the run secret (a run without CURVE): HELLO joins prove it, identities derive from it
    model: str | None = None  # the user model this process was started for (the only one a broker may ask it to run)
    quiet: bool = False
    host_label: str | None = None  # how the live view names this machine (remote runs: the hosts-file name)
    advertise: str | None = None  # a range server on another host: the address it listens on and workers reach
    shared_memory: bool = field(default_factory=enabled_by_default)  # offer the broker shared memory (zsgd.wire.shm)


def join_proof(opts: NodeOptions, role: str | None = None) -> dict[str, str]:
    """The HELLO join's proof of the run secret (``zsgd.wire.auth``), as HELLO meta; nothing under CURVE."""
    if opts.token is None:
        return {}
    from zsgd.wire.auth import hello_proof

    return {"proof": hello_proof(opts.token, role or opts.role, opts.worker_id)}


def log(opts: NodeOptions, text: str) -> None:
    if not opts.quiet:
        who = f"{opts.role} {opts.worker_id}" if opts.worker_id is not None else opts.role
        print(f"zsgd {who}: {text}", file=sys.stderr, flush=True)


def identity_for(opts: NodeOptions) -> bytes:
    """Stable per worker id, so a restarted worker is routed as the same peer; with a run secret, derived
    from it, so no process without the secret can guess a live peer's identity and take over its route."""
    if opts.token is not None:
        from zsgd.wire.auth import secret_identity

        if opts.worker_id is not None:
            return secret_identity(opts.token, opts.role, opts.worker_id)
        import secrets

        return f"zsgd-{opts.role}-{secrets.token_hex(12)}".encode()
    if opts.worker_id is not None:
        if opts.role == "server":
            return f"zsgd-server-{opts.worker_id}".encode()
        return protocol.worker_identity("", opts.worker_id) if opts.role == "worker" else f"zsgd-eval-{opts.worker_id}".encode()
    return f"zsgd-{opts.role}-{socket.gethostname()}-{os.getpid()}".encode()


def expect(opts: NodeOptions, link: Any, types: set, timeout: float, stage: str, who: str = "broker") -> Any:
    """The next message of ``types`` from ``link`` (a ``BrokerLink``) within ``timeout``, or None (logged) if
    ``who`` did not answer or went silent; an ERROR is ZsgdError (refused)."""
    from zsgd.errors import ZsgdError
    from zsgd.wire.link import BROKER_DEAD
    from zsgd.wire.protocol import MsgType

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        msg = link.recv(timeout=min(1.0, max(0.0, deadline - time.monotonic())))
        if msg is None:
            continue
        if msg is BROKER_DEAD:
            break
        if msg.type == MsgType.ERROR:
            raise ZsgdError(f"{who} refused this {opts.role}: {msg.meta.get('message', '?')}")
        if msg.type in types:
            return msg
    log(opts, f"no {who} answered at {link.address} within {timeout:g} s ({stage}); is the {who} running and the address right?")
    return None


EXIT_OK, EXIT_BAD_REPLY, EXIT_USAGE, EXIT_BROKER_GONE = 0, 1, 2, 3


def session_end(opts: NodeOptions, msg: Any, who: str, address: str, turnarounds: list[float], done: str) -> int | None:
    """The exit code when ``msg`` ends a worker's loop (its server went silent, said LEAVE, or sent a fatal
    ERROR), else None; a non-fatal ERROR is logged here and the caller skips it like any non-WEIGHTS message.
    ``done`` is the reason logged when a LEAVE gives none."""
    from zsgd.wire.link import BROKER_DEAD

    if msg is BROKER_DEAD:
        log(opts, f"{who} at {address} silent for {opts.timeout:g} s; exiting")
        return EXIT_BROKER_GONE
    if msg.type == protocol.MsgType.LEAVE:
        log(opts, f"done ({msg.meta.get('reason', done)})")
        log_turnarounds(opts, turnarounds)
        return EXIT_OK
    if msg.type == protocol.MsgType.ERROR:
        log(opts, f"{who} reported an error: {msg.meta.get('message', '?')}")
        if msg.meta.get("fatal"):
            return EXIT_USAGE
    return None


def log_turnarounds(opts: NodeOptions, turnarounds: list[float], what: str = "turnaround") -> None:
    """Log the step-time distribution at the end (20 quantiles in ms, after the first 10 % of steps):
    a simulation of this run takes it as ``--compute trace:FILE`` (``what``: another timed quantity)."""
    if len(turnarounds) < 20:
        return
    import numpy as np

    q = np.quantile(np.asarray(turnarounds[len(turnarounds) // 10:]) * 1e3, (np.arange(20) + 0.5) / 20)
    log(opts, f"{what} ms (20 quantiles, after the first 10 % of steps): " + ",".join(f"{x:.3f}" for x in q))
