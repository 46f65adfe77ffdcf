"""A new kind of server is one class and the factory handed to the broker: a toy service serves a real worker.

A service is built from a ``ServiceContext`` (the ledger, the clock, the membership, a port), never from the
broker, and implements the ``Service`` protocol: every hook the broker, its session, the runner and the live
view call. The toy defines only what ``ServiceBase`` cannot (what to do with an update, the model's version and
weights, a snapshot); a real ``zsgd worker`` process joins it through the real handshake, with the run secret,
and trains against it. The services of zsgd are checked against the protocol, and one is driven by its
context alone, with no broker and no socket.
"""

from __future__ import annotations

import ast
import re
import threading
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from helpers import reap, start_worker
from zsgd.algorithms.schedules import resolve_lr_schedule
from zsgd.core.config import TrainConfig
from zsgd.core.problem import Problem
from zsgd.output.metrics import MetricsWriter
from zsgd.runtime.run_options import NetworkOptions, ServerOptions
from zsgd.runtime.server.broker import Broker, BrokerOptions
from zsgd.runtime.server.context import MembershipView, ServiceContext
from zsgd.runtime.server.service import HOOKS, Service, ServiceBase, missing_hooks
from zsgd.wire import protocol
from zsgd.wire.membership import Membership

ROOT = Path(__file__).resolve().parents[1] / "zsgd"


class CountingService(ServiceBase):
    """Serves the initial weights for ever and counts the updates that come back: the smallest complete service."""

    def __init__(self, ctx, w0: np.ndarray, _opt_state) -> None:
        self.ctx, self.w, self.version = ctx, w0, 0

    def worker_ready(self, peer) -> None:
        self.ctx.port.send(peer, protocol.weights_message(self.ctx.run, self.version, self.w))

    def on_update(self, peer, msg) -> None:
        self.version += 1
        peer.steps += 1
        self.ctx.ledger.applied(self.ctx.elapsed(), version=self.version, n_samples=int(msg.meta["n_samples"]), worker=peer.worker)
        self.ctx.after_update()
        self.ctx.port.send(peer, protocol.weights_message(self.ctx.run, self.version, self.w))

    @property
    def weights(self) -> np.ndarray:
        return self.w

    def snapshot(self) -> np.ndarray:
        return self.w.copy()


class RecordingPort:
    """A port that keeps what a service sends (a test's stand-in for the broker's socket)."""

    emulated, emulator, address, bytes_in, bytes_out, queue_depth = False, None, "tcp://127.0.0.1:1", 0, 0, 0

    def __init__(self) -> None:
        self.sent: list = []
        self.dropped: Counter = Counter()

    def send(self, peer, msg) -> bool:
        self.sent.append((peer.worker, msg))
        return True

    def weights_in_flight(self) -> bool:
        return False


def _context(tmp_path, metrics, n_workers: int = 1, servers: int = 1) -> tuple[ServiceContext, Membership, np.ndarray]:
    """A service's context from parts, as the broker builds it, but with a recording port and no socket."""
    opts = BrokerOptions(server=ServerOptions(servers=servers, start_wait=0.0), n_workers=n_workers)
    cfg = resolve_lr_schedule(TrainConfig(model="logreg", data="embedded", steps=60, batch_size=32, name="toy").validate(), opts.server.algo)
    problem = Problem.from_config(cfg)
    ctx = ServiceContext(run="r1", cfg=cfg, opts=opts, problem=problem, ledger=problem.ledger(cfg, emit=metrics.write), metrics=metrics,
                         run_dir=tmp_path)
    members = Membership(n_workers, timeout=5.0)
    ctx.bind(RecordingPort(), MembershipView(members))
    return ctx, members, problem.model.init(seed=cfg.seed)


def test_the_protocol_lists_every_hook_the_broker_calls_and_no_other():
    callers = [ROOT / "runtime/server/broker.py", ROOT / "runtime/server/session.py", ROOT / "runtime/runner.py", ROOT / "output/live_run.py"]
    called = {name for path in callers for name in re.findall(r"\bservice\.(\w+)", path.read_text())}
    assert called == set(HOOKS), (sorted(called - set(HOOKS)), sorted(set(HOOKS) - called))


def test_every_service_satisfies_the_protocol(tmp_path):
    from zsgd.broker import parameter_server
    from zsgd.decentralized.rules import DecentralizedParams
    from zsgd.decentralized.topology import ring
    from zsgd.runtime.server.relay import relay_service
    from zsgd.runtime.server.sharded import sharded_parameter_server

    with MetricsWriter(tmp_path / "metrics.jsonl") as metrics:
        built = [factory(ctx, w0, None) for factory, (ctx, _m, w0) in [
            (parameter_server, _context(tmp_path, metrics)),
            (sharded_parameter_server, _context(tmp_path, metrics, servers=2)),
            (relay_service("dsgd", ring(3), DecentralizedParams()), _context(tmp_path, metrics, n_workers=3)),
            (CountingService, _context(tmp_path, metrics)),
        ]]
    for service in built:
        assert missing_hooks(service) == [] and isinstance(service, Service), type(service).__name__


def test_a_half_written_service_is_refused_whole(tmp_path):
    class NoSnapshot(ServiceBase):
        version, on_update, weights = 0, CountingService.on_update, CountingService.weights

    base = ServiceBase()
    assert missing_hooks(base) == ["on_update", "snapshot", "version", "weights"]  # what only a service can say
    assert base.checkpoint_state() is None and base.summary() == {} and base.all_serving()  # the rest has defaults
    assert missing_hooks(NoSnapshot()) == ["snapshot"] and not isinstance(NoSnapshot(), Service)
    cfg = TrainConfig(model="logreg", data="embedded", steps=60, batch_size=32, name="toy").validate()
    with MetricsWriter(tmp_path / "metrics.jsonl") as metrics, pytest.raises(TypeError, match="NoSnapshot .* lacks snapshot$"):
        Broker(cfg, Problem.from_config(cfg), BrokerOptions(), tmp_path, metrics, service=lambda ctx, w0, opt_state: NoSnapshot())


def test_a_service_sends_only_once_the_broker_has_bound(tmp_path):
    """The socket is bound after the service is built (its size limit is the service's): the constructor cannot send."""
    ctx = ServiceContext(run="r1", cfg=None, opts=BrokerOptions(), problem=None, ledger=None, metrics=None, run_dir=tmp_path)
    with pytest.raises(RuntimeError, match="once the broker has bound its socket"):
        ctx.port.send(None, None)
    with pytest.raises(RuntimeError, match="membership exists once"):
        ctx.members.live_workers()


def test_services_never_see_the_broker():
    """A service gets its context; no service module imports the broker (but for its options' type) or names it."""
    for name in ("service", "context", "parameter_server", "sharded", "relay"):
        tree = ast.parse((ROOT / "runtime/server" / f"{name}.py").read_text())
        annotations_only = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and ast.unparse(node.test) == "TYPE_CHECKING"
                            for n in ast.walk(node)}
        imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and id(node) not in annotations_only}
        names = {node.id for node in ast.walk(tree) if isinstance(node, ast.Name)}
        attributes = {node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute)}
        assert not imported & {"zsgd.broker", "zsgd.runtime.server.broker"}, name
        assert not names & {"Broker", "broker"} and not attributes & {"b", "broker"}, name  # self.b was the broker


def test_a_parameter_server_runs_on_its_context_alone(tmp_path):
    """Joins, an update, a reply and a rejected update, with a recording port: the context is all it uses."""
    from zsgd.broker import parameter_server

    with MetricsWriter(tmp_path / "metrics.jsonl") as metrics:
        ctx, members, w0 = _context(tmp_path, metrics)
        service = parameter_server(ctx, w0, None)
        peer, _rejoined = members.admit(b"w0", "worker", 0, 0.0)  # what the session does on a join
        service.worker_joined(peer)
        peer.state = "ready"
        service.worker_ready(peer)
        port = ctx.port
        assert [(w, m.type, m.version) for w, m in port.sent] == [(0, protocol.MsgType.WEIGHTS, 0)]
        grad = np.full(w0.size, 0.01, dtype=np.float32)
        service.on_update(peer, protocol.update_message("r1", 0, 0, grad, n_samples=32, loss=2.3))
        assert ctx.ledger.updates == 1 and service.version == 1 and peer.steps == 1
        assert [(w, m.version) for w, m in port.sent[1:]] == [(0, 1)]
        np.testing.assert_allclose(service.weights, w0 - ctx.cfg.lr * grad, rtol=1e-5, atol=1e-7)
        service.on_update(peer, protocol.update_message("r1", 0, 1, grad[:10], n_samples=32, loss=2.3))
    assert sum(ctx.rejected.values()) == 1 and ctx.ledger.updates == 1
    assert '"rejected"' in (tmp_path / "metrics.jsonl").read_text()


@pytest.mark.slow
def test_a_toy_service_serves_a_real_worker(tmp_path, no_orphans):
    from zsgd.wire.auth import new_token
    from zsgd.wire.security import write_secret_json

    cfg = TrainConfig(model="logreg", data="embedded", steps=60, batch_size=32, name="toy").validate()
    token = new_token()
    keys = tmp_path / "keys"
    keys.mkdir(mode=0o700)
    write_secret_json(keys / "run.json", {"token": token})
    opts = BrokerOptions(network=NetworkOptions(heartbeat=0.2, timeout=1.5), n_workers=1, token=token)
    with MetricsWriter(tmp_path / "metrics.jsonl") as metrics:
        # The one line that plugs a service into a broker: the class is its own factory (ctx, w0, opt_state).
        broker = Broker(cfg, Problem.from_config(cfg), opts, tmp_path, metrics, service=CountingService)
        result: dict = {}
        server = threading.Thread(target=lambda: result.update(broker.serve()), daemon=True)
        server.start()
        worker = start_worker(broker.address, "--id", "0", "--heartbeat", "0.2", "--timeout", "1.5", "--quiet", keys=keys)
        try:
            server.join(timeout=120)
            assert not server.is_alive(), "the broker did not end"
        finally:
            reap(worker, timeout=30)
    assert worker.returncode == 0  # told to leave when the run ended
    assert broker.service.version == result["updates"] == 60 and result["stop_reason"] == "reached 60 updates"
    assert result["rejected_messages"] == 0 and result["workers"]["0"]["steps"] == 60
