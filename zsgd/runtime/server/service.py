"""What a broker service is: every hook the broker and its session call, with their defaults.

A service (the parameter server, the coordinator and range servers of
``--servers K``, the decentralized relay) overrides what it needs; the
broker calls every hook unconditionally, so a new service cannot be
half-wired by a missing method. The three a service must define -- what it
does with an update, its model's weights, and a snapshot to evaluate -- raise
here until it does; it keeps its model's ``version`` (an attribute or a
property). A new service is a subclass plus the
factory given to ``Broker(..., service=factory)`` (``tests/test_services.py``
has a toy one that serves a real worker).
"""

from __future__ import annotations

from typing import Any

from zsgd.wire.membership import Peer


class Service:
    b: Any = None  # the broker this service is plugged into (its constructor keeps it)
    limits_factor = 2  # model-sized vectors one inbound message may carry (sizes the socket's limit)
    evaluates_on_cadence = True  # False: the service asks for evaluations itself (request_eval)
    failed = False  # True: the service gave up on the run (the runner then exits non-zero)

    def share_replies(self) -> None:
        """Called when sends are tracked (no emulation): replies may be views of live buffers."""

    def exchanged_size(self, n_params: int) -> int:
        """Elements of the dense vectors workers exchange with this broker: what their shared-memory slots must hold."""
        return n_params

    def refuse_join(self, role: str) -> tuple[str, str] | None:
        """``(reason, message)`` to refuse a joining peer, or None to admit it."""
        return None

    def eval_fields(self, updates: int) -> dict[str, Any]:
        """Extra fields of the ``eval`` event of the model at ``updates``."""
        return {}

    def assign_meta(self, peer: Peer) -> dict[str, Any]:
        return {}

    def worker_joined(self, peer: Peer) -> None:
        """A worker (re)joined: it holds no weights yet."""

    def tick(self, now: float) -> None:
        """Periodic housekeeping."""

    def defer_join(self, role: str) -> bool:
        """True: hold a HELLO join of ``role`` for now (the service calls ``session.replay_deferred()`` when it can assign)."""
        return False

    # -- range servers (--servers K; zsgd.runtime.server.sharded) ----------------------------
    def server_joined(self, peer: Peer) -> None:
        """A range server joined (its ASSIGN is sent): a service without ranges has none to give."""

    def server_ready(self, peer: Peer, msg: Any) -> None:
        """A range server is serving its range."""

    def server_gone(self, peer: Peer, status: str) -> None:
        """A range server left or died."""

    def on_state(self, peer: Peer, msg: Any) -> None:
        """A STATE message from a range server (the broker accepts STATE from no other role)."""

    def server_rows(self) -> list[dict[str, Any]]:
        """One row per range server for the live view (none without --servers)."""
        return []

    def before_leave(self) -> None:
        """The run is ending and the peers are still connected: gather what the end needs."""

    def snapshot(self) -> Any:
        """The model to evaluate now, or None when it is being gathered (the service asks again when it is)."""
        raise NotImplementedError

    # -- what every run calls ------------------------------------------------------------
    def on_update(self, peer: Peer, msg: Any) -> None:
        """An UPDATE from a ready peer (already decoded; shared memory already read)."""
        raise NotImplementedError

    #: The model's version: the updates (or rounds) applied so far; a service keeps it, as an attribute or a property.
    version: int = 0

    @property
    def weights(self) -> Any:
        """The whole model now (the final evaluation, weights.npz)."""
        raise NotImplementedError

    @property
    def current_lr(self) -> float:
        """The step size now, for the live view (NaN: the service has none)."""
        return float("nan")

    def worker_ready(self, peer: Peer) -> None:
        """A worker finished its handshake (and has its data): it may be given work."""

    def worker_gone(self, peer: Peer, status: str) -> None:
        """A worker left, died or is rejoining (``status``): nothing may wait on it any more."""

    def on_peer(self, peer: Peer, frames: list, msg: Any) -> None:
        """A PEER message (decentralized runs relay them); a service without peers rejects it."""
        self.b.reject(peer.identity, "unexpected-type", "PEER is not accepted by this broker")

    def deliver_held(self, direction: str, peer: Peer, payload: Any) -> None:
        """An emulated message is due (``direction`` "in": an update arrives; "out": a reply leaves)."""
        if direction == "in":
            self.on_update(peer, payload)
        else:
            self.b.session.send(peer, payload)

    def checkpoint_state(self) -> tuple[Any, dict] | None:
        """The weights and optimizer state to checkpoint, or None (nothing to save, or being gathered)."""
        return None

    def summary(self) -> dict[str, Any]:
        """The service's own keys in summary.json."""
        return {}

    def all_serving(self) -> bool:
        """Every range server this service needs is serving (none needed: True)."""
        return True
