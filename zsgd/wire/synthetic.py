"""A synthetic worker: zsgd's worker protocol with no model behind it, sending the next update the moment its weights arrive.

Why: what bounds a parameter server with no compute in the way is its own
loop and the messages' crossings; a worker that computes nothing (a fixed
gradient, resent) measures exactly that, as the server knee's workers do.
The simulator's calibration of the broker's per-message cost
(``zsgd.simulation.calibrate``) and ``benchmarks/bench_broker.py`` both
need one, so it lives here, below both the runtime and the simulator
(which must not import each other), beside the protocol it speaks.

What it speaks: a DEALER with the identity the run's secret gives
(``secret_identity``), the HELLO join with its proof, HELLO ready on the
ASSIGN (no data shard wanted), then an UPDATE per exchange; the broker of
``--servers K`` names its range servers in the ASSIGN, and the worker joins
each of them too, as ``zsgd.runtime.worker.sharded_worker`` does, so one
exchange is an update of each range out and every range's weights back.
The joins of several workers go on together (``join_all``): a broker
sends its first weights only once the run's workers have joined.
"""

from __future__ import annotations

import time
from typing import Iterable

import numpy as np
import zmq

from zsgd.errors import ZsgdError
from zsgd.wire import protocol
from zsgd.wire.auth import hello_proof, secret_identity
from zsgd.wire.protocol import Message, MsgType


class SyntheticWorker:
    """Worker ``worker`` of the run whose broker listens at ``endpoint`` (``tcp://host:port``), joined with ``token``
    (None: a broker started without a secret); every update is ``grad`` (default: small noise of ``n_params``)."""

    def __init__(self, ctx: zmq.Context, endpoint: str, worker: int, token: str | None, n_params: int, batch: int = 64,
                 grad: np.ndarray | None = None) -> None:
        self.ctx, self.worker, self.token, self.batch = ctx, int(worker), token, int(batch)
        self.host = endpoint.rsplit(":", 1)[0]
        self.grad = grad if grad is not None else (np.random.default_rng(0).standard_normal(n_params) * 1e-4).astype(np.float32)
        self.links: list[zmq.Socket] = []
        self.span: dict[zmq.Socket, tuple[int, int]] = {}  # each link's range of the vector
        self.run: dict[zmq.Socket, str] = {}
        self.version: dict[zmq.Socket, int] = {}
        self.pending: set[zmq.Socket] = set()  # links whose first weights have not arrived
        self.waiting = 0  # replies outstanding in the current exchange
        self._link(endpoint, (0, int(n_params)))

    def _link(self, endpoint: str, span: tuple[int, int]) -> zmq.Socket:
        d = self.ctx.socket(zmq.DEALER)
        d.linger = 0
        d.sndhwm = d.rcvhwm = 64
        d.setsockopt(zmq.ROUTING_ID, secret_identity(self.token, "worker", self.worker) if self.token
                     else protocol.worker_identity("", self.worker))
        d.connect(endpoint)
        self.links.append(d)
        self.span[d] = span
        protocol.send(d, Message(MsgType.HELLO, "-", self.worker, 0, {}, meta=self._join()))
        self.pending.add(d)
        return d

    def _join(self) -> dict:
        return {"stage": "join", "role": "worker"} | ({"proof": hello_proof(self.token, "worker", self.worker)} if self.token else {})

    def on_join_message(self, d: zmq.Socket) -> None:
        """Read one message waiting on link ``d`` while joining: ASSIGN (answered, and its range servers joined), WEIGHTS
        (that link has joined), ERROR (refused: a ZsgdError with the server's words)."""
        _, msg = protocol.recv(d, flags=zmq.NOBLOCK)
        if msg.type == MsgType.ERROR:
            raise ZsgdError(f"a synthetic worker was refused: {str(msg.meta.get('message'))[:200]}")
        if msg.type == MsgType.ASSIGN:
            self.run[d] = msg.run
            protocol.send(d, Message(MsgType.HELLO, msg.run, self.worker, 0, {}, meta={"stage": "ready", "role": "worker", "need_shard": False}))
            if d is self.links[0] and msg.meta.get("servers"):  # --servers K: the broker keeps range 0, the others serve theirs
                self.span[d] = tuple(msg.meta["range0"])
                for entry in msg.meta["servers"]:
                    self._link(f"{self.host}:{entry['port']}", (int(entry["lo"]), int(entry["hi"])))
        elif msg.type == MsgType.WEIGHTS:
            self.version[d] = msg.version
            self.pending.discard(d)

    def send(self) -> None:
        """Start an exchange: an update of each range, at the version of the weights last received from it."""
        for d in self.links:
            lo, hi = self.span[d]
            protocol.send(d, protocol.update_message(self.run[d], self.worker, self.version[d], self.grad[lo:hi], self.batch, 0.5))
        self.waiting = len(self.links)

    def on_reply(self, d: zmq.Socket) -> bool:
        """Read what is waiting on link ``d``; True once every range's weights are back (the exchange is done)."""
        while True:
            try:
                _, msg = protocol.recv(d, flags=zmq.NOBLOCK)
            except zmq.Again:
                return self.waiting == 0
            if msg.type == MsgType.WEIGHTS:  # anything else (a heartbeat) is not a reply
                self.version[d] = msg.version
                self.waiting -= 1

    def exchanges(self, n: int, timeout_s: float) -> float:
        """Seconds of ``n`` exchanges in a row (updates out, weights back), this worker alone."""
        poller = zmq.Poller()
        for d in self.links:
            poller.register(d, zmq.POLLIN)
        t0 = time.perf_counter()
        for _ in range(n):
            self.send()
            deadline = time.monotonic() + timeout_s
            done = False
            while not done:
                ready = poller.poll(100)
                if not ready and time.monotonic() > deadline:
                    raise ZsgdError(f"a synthetic worker had no reply from the server in {timeout_s:g} s")
                for d, _ in ready:
                    done = self.on_reply(d) or done
        return time.perf_counter() - t0

    def close(self) -> None:
        for d in self.links:
            d.close(linger=0)


def join_all(workers: Iterable[SyntheticWorker], timeout_s: float) -> None:
    """Wait until every worker holds the first weights of every range server it was sent to (their joins go on
    together); a ZsgdError if a server refuses one or ``timeout_s`` passes."""
    workers = list(workers)
    deadline = time.monotonic() + timeout_s
    while any(w.pending for w in workers):
        if time.monotonic() > deadline:
            raise ZsgdError(f"a synthetic worker had no ASSIGN or first weights within {timeout_s:g} s")
        poller = zmq.Poller()
        owner = {}
        for w in workers:
            for d in w.pending:
                poller.register(d, zmq.POLLIN)
                owner[d] = w
        for d, _ in poller.poll(50):
            owner[d].on_join_message(d)


__all__ = ["SyntheticWorker", "join_all"]
