"""What a broker service is: every hook the broker and its session call, as one protocol.

A service (the parameter server, the coordinator and range servers of
``--servers K``, the decentralized relay) decides what the run computes;
it is built by a factory ``factory(ctx, w0, opt_state)`` from a
``ServiceContext`` (``zsgd.runtime.server.context``: the ledger, the clock,
the membership, a port), never from the broker. ``Service`` lists every hook
the broker, its session, the runner and the live view call, so the broker
checks a service whole when it is plugged in (``missing_hooks``) rather than
at the first message that needs a hook it lacks.

``ServiceBase`` gives every optional hook its default. What it cannot give
is what a service is: what it does with an update (``on_update``), its
model's ``version`` (an attribute or a property) and ``weights``, and a
``snapshot`` to evaluate. A new service is a ``ServiceBase`` subclass with
those four, plus the factory given to ``Broker(..., service=factory)``
(``tests/test_services.py`` has a toy one that serves a real worker).
"""

from __future__ import annotations

import inspect
from typing import Any, Protocol, runtime_checkable

from zsgd.wire.membership import Peer


@runtime_checkable
class Service(Protocol):
    """The hooks, grouped by who calls them."""

    # -- read when the broker is built, and by the runner --------------------------------------
    limits_factor: int  # model-sized vectors one inbound message may carry (sizes the socket's limit)
    evaluates_on_cadence: bool  # False: the service asks for evaluations itself (ctx.request_eval)
    failed: bool  # True: the service gave up on the run (the runner then exits non-zero)
    version: int  # the model's version: the updates (or rounds) applied so far; an attribute or a property

    @property
    def weights(self) -> Any:
        """The whole model now (the final evaluation, weights.npz)."""

    @property
    def current_lr(self) -> float:
        """The step size now, for the live view (NaN: the service has none)."""

    def share_replies(self) -> None:
        """Sends are tracked (no emulation): replies may be views of live buffers."""

    def exchanged_size(self, n_params: int) -> int:
        """Elements of the dense vectors workers exchange with this broker: what their shared-memory slots must hold."""

    def all_serving(self) -> bool:
        """Every range server this service needs is serving (none needed: True)."""

    # -- the session: joins, readiness, departures ------------------------------------------------
    def defer_join(self, role: str) -> bool:
        """True: hold a HELLO join of ``role`` for now (the service calls ``ctx.replay_deferred()`` when it can assign)."""

    def refuse_join(self, role: str) -> tuple[str, str] | None:
        """``(reason, message)`` to refuse a joining peer, or None to admit it."""

    def assign_meta(self, peer: Peer) -> dict[str, Any]:
        """The service's fields of the ASSIGN ``peer`` gets."""

    def worker_joined(self, peer: Peer) -> None:
        """A worker (re)joined: it holds no weights yet."""

    def worker_ready(self, peer: Peer) -> None:
        """A worker finished its handshake (and has its data): it may be given work."""

    def worker_gone(self, peer: Peer, status: str) -> None:
        """A worker left, died or is rejoining (``status``): nothing may wait on it any more."""

    def server_joined(self, peer: Peer) -> None:
        """A range server joined (its ASSIGN is sent)."""

    def server_ready(self, peer: Peer, msg: Any) -> None:
        """A range server is serving its range."""

    def server_gone(self, peer: Peer, status: str) -> None:
        """A range server left or died."""

    # -- the broker's loop: messages, time, evaluations ------------------------------------------
    def on_update(self, peer: Peer, msg: Any) -> None:
        """An UPDATE from a ready peer (already decoded; shared memory already read)."""

    def on_peer(self, peer: Peer, frames: list, msg: Any) -> None:
        """A PEER message (decentralized runs relay them)."""

    def on_state(self, peer: Peer, msg: Any) -> None:
        """A STATE message from a range server (the broker accepts STATE from no other role)."""

    def deliver_held(self, direction: str, peer: Peer, payload: Any) -> None:
        """An emulated message is due (``direction`` "in": an update arrives; "out": a reply leaves; or the service's own)."""

    def tick(self, now: float) -> None:
        """Periodic housekeeping (``now``: the monotonic clock)."""

    def snapshot(self) -> Any:
        """The model to evaluate now, or None when it is being gathered (then ``ctx.snapshot_ready()`` when it is)."""

    def eval_fields(self, updates: int) -> dict[str, Any]:
        """Extra fields of the ``eval`` event of the model at ``updates``."""

    def server_rows(self) -> list[dict[str, Any]]:
        """One row per server for the live view."""

    # -- the end -----------------------------------------------------------------------------------
    def checkpoint_state(self) -> tuple[Any, dict] | None:
        """The weights and optimizer state to checkpoint, or None (nothing to save, or being gathered)."""

    def before_leave(self) -> None:
        """The run is ending and the peers are still connected: gather what the end needs."""

    def summary(self) -> dict[str, Any]:
        """The service's own keys in summary.json."""


HOOKS: tuple[str, ...] = tuple(sorted(n for n in {**vars(Service), **Service.__annotations__} if not n.startswith("_")))
"""Every name of the protocol."""


def missing_hooks(service: Any) -> list[str]:
    """The hooks ``service`` lacks (properties are looked up, not run)."""
    missing = []
    for name in HOOKS:
        try:
            inspect.getattr_static(service, name)
        except AttributeError:
            missing.append(name)
    return missing


class ServiceBase:
    """Every optional hook's default (see ``Service`` for what each is). A subclass keeps its context in ``ctx``
    and defines ``on_update``, ``version``, ``weights`` and ``snapshot``."""

    ctx: Any = None  # the ServiceContext it was built with (its constructor keeps it)
    limits_factor = 2
    evaluates_on_cadence = True
    failed = False

    @property
    def current_lr(self) -> float:
        return float("nan")

    def share_replies(self) -> None:
        pass

    def exchanged_size(self, n_params: int) -> int:
        return n_params

    def all_serving(self) -> bool:
        return True

    def defer_join(self, role: str) -> bool:
        return False

    def refuse_join(self, role: str) -> tuple[str, str] | None:
        return None

    def assign_meta(self, peer: Peer) -> dict[str, Any]:
        return {}

    def worker_joined(self, peer: Peer) -> None:
        pass

    def worker_ready(self, peer: Peer) -> None:
        pass

    def worker_gone(self, peer: Peer, status: str) -> None:
        pass

    def server_joined(self, peer: Peer) -> None:
        pass  # a service without ranges has none to give

    def server_ready(self, peer: Peer, msg: Any) -> None:
        pass

    def server_gone(self, peer: Peer, status: str) -> None:
        pass

    def on_peer(self, peer: Peer, frames: list, msg: Any) -> None:
        self.ctx.reject(peer.identity, "unexpected-type", "PEER is not accepted by this broker")

    def on_state(self, peer: Peer, msg: Any) -> None:
        pass

    def deliver_held(self, direction: str, peer: Peer, payload: Any) -> None:
        if direction == "in":
            self.on_update(peer, payload)  # type: ignore[attr-defined]  # a subclass defines it
        else:
            self.ctx.port.send(peer, payload)

    def tick(self, now: float) -> None:
        pass

    def eval_fields(self, updates: int) -> dict[str, Any]:
        return {}

    def server_rows(self) -> list[dict[str, Any]]:
        return []  # none without --servers

    def checkpoint_state(self) -> tuple[Any, dict] | None:
        return None

    def before_leave(self) -> None:
        pass

    def summary(self) -> dict[str, Any]:
        return {}
