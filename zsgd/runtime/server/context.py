"""What a service is given: the parts of the broker it needs, never the broker itself.

A service (``zsgd.runtime.server.service``) decides what the run computes;
the broker around it owns the socket, the handshake and the main loop. A
service that held the broker could reach all of that, and did: membership
was mutated from three places, and nobody could say which broker state a
service depended on. It now gets a ``ServiceContext``: the run's
configuration, its ledger and metrics, the time, a read-only view of who is
in the run, a port to send through, and the few broker actions a service
triggers. That is the whole surface, so a service can be built and driven
by a test without a socket, and a change inside the broker cannot reach
past it.

The port and the membership exist only once the broker has bound its
socket, which happens after the service is built (the socket's size limit
is the service's ``limits_factor``): a service uses them from its hooks,
never from its constructor.
"""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Callable, Iterator

import numpy as np

from zsgd.core.config import TrainConfig
from zsgd.core.ledger import RunLedger
from zsgd.errors import ProtocolError
from zsgd.output.metrics import MetricsWriter
from zsgd.runtime.server.checkpoint import save_checkpoint
from zsgd.wire import protocol
from zsgd.wire.membership import Membership, Peer
from zsgd.wire.protocol import Message

if TYPE_CHECKING:
    from zsgd.runtime.server.broker import BrokerOptions
    from zsgd.runtime.server.endpoint import Endpoint
    from zsgd.runtime.server.session import Session


class MembershipView:
    """Who is in the run, read-only: a service looks peers up; only the session admits and drops them.

    The mappings are live views of the session's own (never copies), so a
    look-up per message costs what it did when services read the session."""

    __slots__ = ("_members", "by_worker", "servers", "peers")

    def __init__(self, members: Membership) -> None:
        self._members = members
        self.by_worker = MappingProxyType(members.by_worker)  # worker id -> its peer (gone ones too)
        self.servers = MappingProxyType(members.servers)  # --servers K: range server index -> its peer
        self.peers = MappingProxyType(members.peers)  # routing identity -> peer

    def live_workers(self) -> list[Peer]:
        """The workers that are ready now (a sync round's contributors)."""
        return self._members.live_workers()


class ServicePort:
    """How a service's messages leave (and, once, arrive outside the broker's loop).

    ``send``, ``hold`` and ``forward`` are the endpoint's and session's own
    bound methods, so a reply costs no extra call on the hot path."""

    def __init__(self, endpoint: "Endpoint", session: "Session", emulator: Any) -> None:
        self._endpoint = endpoint
        self.send: Callable[[Peer, Message], bool] = session.send
        """Send ``msg`` to ``peer`` now; False when it could not go out (a full queue, a gone peer)."""
        self.emulated = endpoint.held is not None
        """True when the network is emulated: replies and relays are held (``hold``) until their delay passes."""
        self.emulator = emulator
        """The link emulator (``zsgd.runtime.emulation``) whose draws give the delays to hold for; None without emulation."""
        self.hold: Callable[[Any, float], None] = endpoint.hold
        """Park ``(direction, peer, payload)`` for ``delay`` seconds; the broker hands it to ``deliver_held`` when due."""
        self.forward: Callable[[bytes, list], str | None] = endpoint.forward
        """Send a message's original frames on to another peer (the relay never re-encodes); the failure's reason, or None."""
        self.weights_in_flight: Callable[[], bool] = endpoint.weights_in_flight
        """True while a zero-copy send of the live weights is still in flight (the algorithm must copy before an update)."""
        self.address: str = endpoint.address
        """The broker's bound address (range servers bind on the same host)."""

    @property
    def dropped(self) -> Counter:
        """Sends that could not go out, by reason (the summary's ``dropped_updates``)."""
        return self._endpoint.dropped

    @property
    def bytes_in(self) -> int:
        """Bytes received so far (live views, and the relay's ``bytes_total``)."""
        return self._endpoint.bytes_in

    @property
    def bytes_out(self) -> int:
        """Bytes sent so far."""
        return self._endpoint.bytes_out

    @property
    def queue_depth(self) -> int:
        """Messages found waiting at the last receive: how far behind the server is (live view)."""
        return self._endpoint.queue_depth

    def drain(self, timeout_s: float) -> Iterator[tuple[bytes, Message]]:
        """The messages that arrive within ``timeout_s``, decoded; undecodable ones are skipped.

        For a service that waits for answers after the broker's loop has ended
        (the coordinator's final gather of the range servers' state)."""
        endpoint = self._endpoint
        if not endpoint.poll(timeout_s):
            return
        for frames in endpoint.receive():
            try:
                msg = protocol.decode(frames[1:], endpoint.limits)
            except ProtocolError:
                continue
            yield frames[0].bytes, msg


class _Unbound:
    """Stands for the port and the membership until the broker has bound: a clear error, not a None."""

    def __init__(self, what: str) -> None:
        self._what = what

    def __getattr__(self, name: str) -> Any:
        raise RuntimeError(f"the service's {self._what} exists once the broker has bound its socket: use it from a hook, "
                           f"not from the service's constructor")


class ServiceContext:
    """Everything a service may use; see the module docstring for why it is not the broker."""

    def __init__(self, *, run: str, cfg: TrainConfig, opts: "BrokerOptions", problem: Any, ledger: RunLedger, metrics: MetricsWriter,
                 run_dir: Path, t_offset: float = 0.0, after_update: Callable[[], None] = lambda: None,
                 request_eval: Callable[[], None] = lambda: None, snapshot_ready: Callable[[], None] = lambda: None,
                 replay_deferred: Callable[[], None] = lambda: None) -> None:
        self.run = run
        """The run id: every message a service sends carries it."""
        self.cfg = cfg
        """The run's training configuration (learning rate and its schedule, clipping, batch size, seed)."""
        self.opts = opts
        """The broker's options, read-only: worker count, server and network options, emulation specs, CURVE keys to hand on."""
        self.problem = problem
        """The model and data set (the relay's evaluation cadence depends on the training set's size)."""
        self.ledger = ledger
        """Counts, losses, evaluation cadence, stop and divergence rules: a service books what it applies here."""
        self.metrics = metrics
        """The run's metrics.jsonl, for a service's own events (the start barrier, range servers, rounds)."""
        self.rejected: Counter = Counter()
        """Rejected messages by reason (``reject`` counts here; the summary reports them)."""
        self.port: ServicePort = _Unbound("port")  # type: ignore[assignment]
        self.members: MembershipView = _Unbound("membership")  # type: ignore[assignment]
        self._run_dir, self._t_offset, self._t0 = run_dir, t_offset, time.monotonic()
        self._after_update, self._request_eval = after_update, request_eval
        self._snapshot_ready, self._replay_deferred = snapshot_ready, replay_deferred

    def bind(self, port: ServicePort, members: MembershipView) -> None:
        """The broker has its socket and session: the service may send and look peers up from now on."""
        self.port, self.members = port, members

    def elapsed(self) -> float:
        """Seconds since the run started (continuing a resumed run's clock): the time every event and decision carries."""
        return self._t_offset + time.monotonic() - self._t0

    def reject(self, identity: bytes, reason: str, text: str) -> None:
        """A bad message from ``identity``: counted by reason and logged; the run goes on."""
        self.rejected[reason] += 1
        self.metrics.write("rejected", self.elapsed(), reason=reason, detail=text[:200], peer=identity[:64].hex())

    def after_update(self) -> None:
        """The service applied an update (the ledger has it): the broker evaluates and checkpoints on their cadences."""
        self._after_update()

    def request_eval(self) -> None:
        """Ask for an evaluation of the model now (a service whose model exists only at some steps: the relay's x_bar)."""
        self._request_eval()

    def snapshot_ready(self) -> None:
        """A snapshot that ``snapshot()`` returned None for has been gathered: the broker asks for it again and sends it."""
        self._snapshot_ready()

    def replay_deferred(self) -> None:
        """Answer the joins the service held with ``defer_join`` (now that it can assign them)."""
        self._replay_deferred()

    def write_checkpoint(self, w: np.ndarray, opt_state: dict) -> None:
        """Write the run's checkpoint of ``w`` and its optimizer state, with the ledger's counters and the clock."""
        counters = {"updates": self.ledger.updates, "samples": self.ledger.samples, "elapsed": self.elapsed(),
                    "algo": self.opts.server.algo, "run": self.run}
        save_checkpoint(self._run_dir, w, opt_state, counters)
