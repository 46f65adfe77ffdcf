"""A worker's connection to the broker, with heartbeats that never stop.

The ZeroMQ DEALER is owned by one I/O thread (ZeroMQ sockets are not
thread-safe); the compute thread talks to it through an ``inproc`` PAIR.
So heartbeats keep flowing while a long gradient computation runs, and a
silent broker is noticed within ``timeout`` even mid-step (the Paranoid
Pirate pattern: any traffic counts as a heartbeat).

Messages from the broker reach the compute thread unchanged (zero-copy
frames); heartbeats are consumed here. When the broker falls silent the
thread delivers a local ``broker-dead`` marker and ends.
"""

from __future__ import annotations

import math
import re
import threading
import time
import uuid

import zmq

from zsgd.errors import ZsgdError
from zsgd.wire import protocol
from zsgd.wire.memory import keep_message_memory
from zsgd.wire.protocol import Message, MsgType
from zsgd.wire.shm import WorkerShare

BROKER_DEAD = b"zsgd:broker-dead"
STOP = b"zsgd:stop"


def check_endpoint(address: str, what: str = "--connect") -> str:
    """``address`` if it is a connectable ZeroMQ endpoint (tcp://HOST:PORT, ipc://PATH), else ZsgdError.

    Checked before any socket exists: ZeroMQ reports a bad address only as an
    EINVAL from ``connect`` inside the link thread.
    """
    if not isinstance(address, str) or not address.startswith(("tcp://", "ipc://")):
        raise ZsgdError(f"{what} needs tcp://HOST:PORT or ipc://PATH, got {address!r}")
    if address.startswith("ipc://"):
        if not address[len("ipc://"):].strip():
            raise ZsgdError(f"{what} {address!r}: ipc:// needs a socket path, e.g. ipc:///tmp/zsgd.sock")
        return address
    match = re.fullmatch(r"tcp://(\[[0-9A-Fa-f:.]+\]|[^\s:/\[\]]+):([0-9]+)", address)
    if match is None or match.group(1) == "*" or not 1 <= int(match.group(2)) <= 65535:
        raise ZsgdError(f"{what} {address!r}: expected tcp://HOST:PORT with a host and a port in 1-65535, e.g. tcp://127.0.0.1:5555")
    return address


def check_intervals(heartbeat: float, timeout: float) -> None:
    """ZsgdError unless 0 < heartbeat < timeout, both finite (nan and inf would make every wait endless)."""
    for name, value in (("--heartbeat", heartbeat), ("--timeout", timeout)):
        if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise ZsgdError(f"{name} must be a positive number of seconds, got {value!r}")
    if timeout <= heartbeat:
        raise ZsgdError(f"--timeout ({timeout:g} s) must be longer than --heartbeat ({heartbeat:g} s)")


class BrokerLink:
    """Start with ``open()``; then ``send``/``recv`` from the compute thread."""

    def __init__(self, ctx: zmq.Context, address: str, identity: bytes, run: str, worker: int, heartbeat: float, timeout: float, curve: dict | None = None) -> None:
        self.ctx = ctx
        self.address = address
        self.identity = identity
        self.run = run
        self.worker = worker
        self.heartbeat = heartbeat
        self.timeout = timeout
        self.curve = curve
        self._pipe_name = f"inproc://zsgd-link-{uuid.uuid4().hex}"
        self._pipe = ctx.socket(zmq.PAIR)
        self._pipe.linger = 0
        self._pipe.bind(self._pipe_name)
        self._thread = threading.Thread(target=self._pump, name="zsgd-link", daemon=True)
        self.bytes_sent = 0
        self.bytes_received = 0
        self.error: str | None = None  # why the link thread died, if it did
        self.last_arrival = 0.0  # time.monotonic() when the I/O thread got the latest broker message (not heartbeats)
        self.last_forward = 0.0  # ... and when it last passed a message of the compute thread on to the broker
        self._linger_ms: int | None = None  # set by close(); None: the socket's own (a thread that ended on its own)
        self.shared = WorkerShare()  # shared memory with the broker: not offered unless offer_shared_memory()

    def open(self) -> "BrokerLink":
        keep_message_memory()  # before the first message: the weights' receive buffers reused, not faulted in (zsgd.wire.memory)
        self._thread.start()
        return self

    def set_identity(self, run: str, worker: int) -> None:
        """Heartbeats carry the run id and worker id the broker assigned."""
        self.run, self.worker = run, worker

    # -- compute-thread side -------------------------------------------------
    def offer_shared_memory(self, n_params: int) -> None:
        """Offer the broker shared-memory slots for the big arrays (``zsgd.wire.shm``) with the first dense update."""
        self.shared = WorkerShare(n_params)

    def send(self, msg: Message) -> None:
        """Hand ``msg`` to the I/O thread; dropped once that thread has ended (the next ``recv`` says why),
        ZsgdError if it failed.

        Never blocks for good: a PAIR socket whose peer has gone blocks a send
        forever, and a worker finishing a step just after its broker left
        would hang there instead of reading the LEAVE already waiting for it.
        """
        frames = protocol.encode(self.shared.outgoing(msg))
        while True:
            self._check_alive()
            try:
                self._pipe.send_multipart(frames, copy=False, flags=zmq.NOBLOCK)
                return
            except zmq.Again:
                if not self._thread.is_alive():
                    self._check_alive()
                    return
                self._pipe.poll(100, zmq.POLLOUT)

    def recv(self, timeout: float) -> Message | bytes | None:
        """The next broker message, ``BROKER_DEAD``, or None on timeout (or for weights in shared memory already
        superseded: their successor is on its way); ZsgdError if the link thread failed."""
        if not self._pipe.poll(int(timeout * 1000)):
            self._check_alive()
            return BROKER_DEAD if not self._thread.is_alive() and not self._pipe.poll(0) else None
        frames = self._pipe.recv_multipart(copy=False)
        if len(frames) == 1 and frames[0].bytes == BROKER_DEAD:
            return BROKER_DEAD
        return self.shared.incoming(protocol.decode(frames))

    @property
    def wake_socket(self) -> zmq.Socket:
        """Readable when a message (or ``BROKER_DEAD``) waits for ``recv``: to poll beside other sockets."""
        return self._pipe

    def _check_alive(self) -> None:
        if self.error is not None:
            raise ZsgdError(f"connection to {self.address} failed: {self.error}")

    def close(self, flush: bool = True) -> None:
        """Stop the I/O thread. ``flush``: give messages still queued (a final LEAVE) up to a second to go out;
        False once the broker has said LEAVE or is gone, since nothing queued then can matter, and waiting
        for it would only hold the process (and the broker's wait for its children) for that second."""
        self._linger_ms = 1000 if flush else 0
        self.shared.close()
        if self._thread.is_alive():
            try:  # NOBLOCK: the thread may close its end between the check and the send, and a send to no peer never returns
                self._pipe.send(STOP, flags=zmq.NOBLOCK)
            except zmq.ZMQError:  # zmq.Again: it has ended, or will see the broker gone; the join below is bounded either way
                pass
            self._thread.join(timeout=2 * self.heartbeat + 1)
        self._pipe.close(linger=0)

    # -- I/O thread ----------------------------------------------------------
    def _pump(self) -> None:
        try:
            self._pump_frames()
        except Exception as exc:  # noqa: BLE001 -- the compute thread reports it (as one line) and ends the process
            self.error = str(exc) or type(exc).__name__

    def _pump_frames(self) -> None:
        pipe = self.ctx.socket(zmq.PAIR)  # first: a failure below must never leave the compute thread's sends blocked
        pipe.linger = 0
        pipe.connect(self._pipe_name)
        dealer = None
        try:
            dealer = self.ctx.socket(zmq.DEALER)
            dealer.linger = 1000  # lets a final LEAVE out, but never blocks exit for long (close(flush=False): 0)
            dealer.setsockopt(zmq.ROUTING_ID, self.identity)
            dealer.sndhwm = dealer.rcvhwm = 16
            dealer.setsockopt(zmq.RECONNECT_IVL, 100)
            dealer.setsockopt(zmq.RECONNECT_IVL_MAX, 2000)
            protocol.set_socket_limits(dealer)  # a shard is the largest message a worker takes (DEFAULT_LIMITS)
            if self.curve:
                dealer.curve_secretkey = self.curve["secret"]
                dealer.curve_publickey = self.curve["public"]
                dealer.curve_serverkey = self.curve["server"]
            dealer.connect(self.address)
            poller = zmq.Poller()
            poller.register(dealer, zmq.POLLIN)
            poller.register(pipe, zmq.POLLIN)
            last_recv = last_send = time.monotonic()
            while True:
                now = time.monotonic()
                wait = max(0.0, min(last_send + self.heartbeat, last_recv + self.timeout) - now)
                events = dict(poller.poll(int(wait * 1000) + 1))
                now = time.monotonic()
                if pipe in events:
                    frames = pipe.recv_multipart(copy=False)
                    if len(frames) == 1 and frames[0].bytes == STOP:
                        return
                    dealer.send_multipart(frames, copy=False)
                    self.last_forward = time.monotonic()
                    self.bytes_sent += sum(len(f.buffer) for f in frames)
                    last_send = now
                if dealer in events:
                    frames = dealer.recv_multipart(copy=False)
                    last_recv = now
                    self.bytes_received += sum(len(f.buffer) for f in frames)
                    if not _is_heartbeat(frames):
                        self.last_arrival = now
                        pipe.send_multipart(frames, copy=False)
                if now - last_send >= self.heartbeat:
                    dealer.send_multipart(protocol.encode(protocol.heartbeat(self.run, self.worker)))
                    last_send = now
                if now - last_recv > self.timeout:
                    pipe.send(BROKER_DEAD)
                    return
        finally:
            if dealer is not None:
                dealer.close(linger=self._linger_ms)
            pipe.close(linger=0)


def recv_any(links: list["BrokerLink"], timeout: float) -> tuple[int, Message | bytes] | None:
    """The next message from whichever of ``links`` has one: ``(index, message or BROKER_DEAD)``, or None on timeout.

    A worker of a sharded run (``--servers K``) holds one link per server and
    takes whichever range arrives first.
    """
    for i, link in enumerate(links):  # a dead link thread shows as BROKER_DEAD at once, not after the poll
        if not link._thread.is_alive() and not link._pipe.poll(0):
            link._check_alive()
            return i, BROKER_DEAD
    poller = zmq.Poller()
    for link in links:
        poller.register(link._pipe, zmq.POLLIN)
    ready = dict(poller.poll(int(timeout * 1000)))
    for i, link in enumerate(links):
        if link._pipe in ready:
            msg = link.recv(0)
            if msg is not None:
                return i, msg
    return None


def _is_heartbeat(frames: list) -> bool:
    head = frames[0].buffer
    return len(frames) == 1 and len(head) >= 4 and head[3] == MsgType.HEARTBEAT
