"""What a worker or evaluator process is told at start, and how it speaks.

Shared by the centralized worker (``zsgd.node``) and the decentralized node
loop, which must not import each other.
"""

from __future__ import annotations

import os
import socket
import sys
from dataclasses import dataclass

from zsgd.wire import protocol


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
    quiet: bool = False
    host_label: str | None = None  # how the live view names this machine (remote runs: the hosts-file name)
    advertise: str | None = None  # a range server on another host: the address it listens on and workers reach


def log(opts: NodeOptions, text: str) -> None:
    if not opts.quiet:
        who = f"{opts.role} {opts.worker_id}" if opts.worker_id is not None else opts.role
        print(f"zsgd {who}: {text}", file=sys.stderr, flush=True)


def identity_for(opts: NodeOptions) -> bytes:
    """Stable per worker id, so a restarted worker is routed as the same peer."""
    if opts.worker_id is not None:
        if opts.role == "server":
            return f"zsgd-server-{opts.worker_id}".encode()
        return protocol.worker_identity("", opts.worker_id) if opts.role == "worker" else f"zsgd-eval-{opts.worker_id}".encode()
    return f"zsgd-{opts.role}-{socket.gethostname()}-{os.getpid()}".encode()
