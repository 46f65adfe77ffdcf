"""The broker's endpoint: its ROUTER socket and everything about using it.

One object owns the socket's life (bind, CURVE and its ZAP guard, limits,
close), the byte counters, the weak references that tell when a
zero-copy weights send is done (so the server algorithm may reuse the
buffer), and, in emulated runs, the queue that holds messages until their
emulated network delay has passed. The session (who is in the run) and the
service (what the run computes) never touch the socket themselves.

Limits are on from the start: ``ZMQ_MAXMSGSIZE`` is set from the model's
size before binding, so libzmq refuses a frame larger than any message this
run can carry while reading it, closing that connection, and never buffers
it whole; such closed connections are counted (``dropped_connections``),
read from the socket monitor.
"""

from __future__ import annotations

import time
import weakref
from collections import Counter
from pathlib import Path
from typing import Any, Iterator

import zmq

from zsgd.errors import ZsgdError
from zsgd.wire import protocol
from zsgd.wire.memory import keep_message_memory
from zsgd.wire.protocol import Message, MsgType


class Endpoint:
    """A bound ROUTER socket with tracked sends, limits, CURVE and an optional emulated-network queue."""

    HWM = 64  # messages queued per peer before a send would block (then it is dropped and counted)

    def __init__(self, bind: str, limits: protocol.Limits, run_dir: Path, curve: dict | None = None, emulated: bool = False) -> None:
        self.limits = limits
        keep_message_memory()  # before the first message: model-size receive buffers reused, not faulted in (zsgd.wire.memory)
        self.ctx = zmq.Context()
        self.bytes_in = self.bytes_out = 0
        self.queue_depth = self._burst = 0  # messages found waiting at the last receive
        self.dropped: Counter = Counter()  # sends that could not go out, by reason
        self._disconnects = 0  # without CURVE; with it the guard's monitor counts them (one monitor per socket)
        self._weight_sends: list[weakref.ref] = []  # the last frame of each zero-copy weights send, while ZeroMQ holds it
        self.guard = None  # CURVE: ZAP allow-list + refusal counter (zsgd.wire.security)
        self.shared: Any = None  # zsgd.wire.shm.SharedPeers: workers on this machine that share memory with it
        self.sock = self._bind(bind, curve, run_dir)
        self._monitor = self.sock.get_monitor_socket(zmq.EVENT_DISCONNECTED) if self.guard is None else None
        if emulated:
            from zsgd.runtime.emulation import DelayQueue

            self.held: Any = DelayQueue()  # emulated network: messages parked until due
        else:
            self.held = None

    def _bind(self, addr: str, curve: dict | None, run_dir: Path) -> zmq.Socket:
        sock = self.ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        sock.setsockopt(zmq.ROUTER_HANDOVER, 1)
        sock.sndhwm = sock.rcvhwm = self.HWM
        sock.linger = 0
        protocol.set_socket_limits(sock, self.limits)
        if curve:
            from zsgd.wire.security import CurveGuard

            sock.curve_server = True
            sock.curve_secretkey = curve["secret"]
            sock.curve_publickey = curve["public"]
            self.guard = CurveGuard(self.ctx, curve.get("allowed", ()), run_dir / "security.log")
            self.guard.attach(sock)
        try:
            if addr.startswith("tcp://") and addr.endswith(":0"):
                port = sock.bind_to_random_port(addr[:-2])
                self.address = f"{addr[:-2]}:{port}"
            else:
                sock.bind(addr)
                self.address = sock.getsockopt_string(zmq.LAST_ENDPOINT)
        except zmq.ZMQError as exc:
            sock.close()
            if self.guard is not None:
                self.guard.stop()
            self.ctx.term()
            if exc.errno == zmq.EADDRINUSE:
                raise ZsgdError(f"cannot listen on {addr}: the port is in use; choose another with --port (0 picks a free one)") from None
            raise ZsgdError(f"cannot listen on {addr}: {exc}") from None
        return sock

    # -- receiving ---------------------------------------------------------------
    def poll(self, timeout_s: float) -> bool:
        """Wait up to ``timeout_s`` for a message; True when one can be read."""
        self._count_disconnects()
        return bool(self.sock.poll(max(0, int(timeout_s * 1000)), zmq.POLLIN))

    def poll_with(self, other: zmq.Socket, timeout_s: float) -> tuple[bool, bool]:
        """``poll``, also waking for ``other``: (this socket readable, ``other`` readable)."""
        self._count_disconnects()
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        poller.register(other, zmq.POLLIN)
        ready = dict(poller.poll(max(0, int(timeout_s * 1000))))
        return self.sock in ready, other in ready

    def receive(self, burst: int = 256) -> Iterator[list[zmq.Frame]]:
        """Up to ``burst`` waiting multipart messages (identity first), without blocking.

        ``queue_depth`` keeps how many were waiting at the last burst: the
        live view's sign of a server that cannot keep up (1 means it never
        had a backlog)."""
        self._burst = 0
        for _ in range(burst):
            try:
                frames = self.sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            self.bytes_in += sum(len(f.buffer) for f in frames[1:])
            self._burst += 1
            self.queue_depth = self._burst
            yield frames

    def _count_disconnects(self) -> None:
        while self._monitor is not None and self._monitor.poll(0):
            self._monitor.recv_multipart()
            self._disconnects += 1

    @property
    def dropped_connections(self) -> int:
        """Connections closed under the broker: a frame over the size limit (libzmq drops it unread), or a vanished peer."""
        return self.guard.dropped if self.guard is not None else self._disconnects

    @staticmethod
    def client_key(frame: Any) -> str | None:
        """The CURVE client key (ZAP User-Id) a frame arrived with, or None without CURVE."""
        try:
            return frame.get("User-Id")
        except (zmq.ZMQError, AttributeError):
            return None

    # -- sending -----------------------------------------------------------------
    def send(self, identity: bytes, msg: Message) -> bool:
        """Encode and send ``msg`` to one peer; False (and counted) when it cannot go out now."""
        sent = self.shared.outgoing(identity, msg) if self.shared is not None else msg  # shared memory: copied into its slot now
        track = sent.type == MsgType.WEIGHTS and sent.codec == "none" and "w" in sent.arrays
        # Encoded with the receiver's limits (a worker takes a whole data shard), not this socket's
        # inbound ones, which are sized for the model. The reply of every update (the weights, no meta: every
        # field of its header is the server's own) skips the sender's re-parse of its header; the worker checks it.
        frames = protocol.encode(sent, check=not (track and not sent.meta))
        # What the peer gets, over the socket or through shared memory (the frames' own sizes when they carry it all:
        # the header is not encoded twice per message).
        nbytes = sum(len(f) for f in frames) if sent is msg else protocol.message_nbytes(msg)
        if self._send_frames(identity, frames) is False:
            return False
        if track:
            # pyzmq keeps the object it sends zero-copy until ZeroMQ's I/O thread is done with it (its garbage-collector
            # thread drops it then; a frame under the copy threshold is copied and dropped at once), so a weak reference
            # to it says what a tracked send's MessageTracker says, without a tracker and its Event per reply (24 us
            # of a reply's send, cold) or the event the collector thread sets for each.
            self._weight_sends.append(weakref.ref(frames[-1]))
        self.bytes_out += nbytes
        return True

    def share_memory(self, n_params: int, enabled: bool = True) -> None:
        """Take shared-memory offers from workers on this machine (``zsgd.wire.shm``) for vectors of ``n_params``;
        ``enabled`` False (``--no-shared-memory``): decline every one."""
        from zsgd.wire.shm import SharedPeers

        self.shared = SharedPeers(n_params, enabled=enabled)

    def forget_shared(self, identity: bytes) -> None:
        if self.shared is not None:
            self.shared.forget(identity)

    def forward(self, identity: bytes, frames: list) -> str | None:
        """Send already-encoded frames as they are (the relay); the reason when they cannot go out, else None."""
        result = self._send_frames(identity, frames, count=False)
        if result is False:
            return self._last_failure
        self.bytes_out += sum(len(f.buffer) if hasattr(f, "buffer") else len(f) for f in frames)
        return None

    def _send_frames(self, identity: bytes, frames: list, count: bool = True) -> Any:
        try:
            return self.sock.send_multipart([identity, *frames], flags=zmq.NOBLOCK, copy=False)
        except zmq.Again:
            self._last_failure = "send-queue-full"
        except zmq.ZMQError as exc:
            if exc.errno != zmq.EHOSTUNREACH:
                raise
            self._last_failure = "peer-unreachable"
        if count:
            self.dropped[self._last_failure] += 1
        return False

    def weights_in_flight(self) -> bool:
        """Whether ZeroMQ may still read a full-weights message sent earlier (its last frame is the live weights)."""
        self._weight_sends = [ref for ref in self._weight_sends if ref() is not None]
        return bool(self._weight_sends)

    # -- the emulated network ----------------------------------------------------
    def hold(self, item: Any, delay: float) -> None:
        self.held.push(item, time.monotonic(), delay)

    def due(self, now: float) -> list[Any]:
        return self.held.pop_due(now) if self.held is not None else []

    def poll_timeout(self, wait: float) -> float:
        """``wait`` shortened so that the next held message leaves on time."""
        if self.held is not None and self.held.next_due() is not None:
            return max(0.0, min(wait, self.held.next_due() - time.monotonic()))
        return wait

    @property
    def refused(self) -> int:
        return self.guard.refused if self.guard is not None else 0

    def close(self, linger_ms: int = 500) -> None:
        self._count_disconnects()
        if self.shared is not None:
            self.shared.close()
        if self._monitor is not None:
            # In this order: libzmq sends a last event to the monitor when it is disabled, and a PAIR send with
            # its reader already closed blocks for ever (the broker hung at the end of runs; pyzmq#1020, libzmq#3575).
            self.sock.disable_monitor()
            self._monitor.close(linger=0)
        self.sock.close(linger=linger_ms)
        if self.guard is not None:
            self.guard.stop()
        self.ctx.term()
