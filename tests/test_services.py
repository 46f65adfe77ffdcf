"""A new kind of server is one class and the factory handed to the broker: a toy service serves a real worker.

The toy defines only what ``zsgd.runtime.server.service.Service`` requires (what to do with an update, the
model's version and weights, a snapshot); every other hook the broker and its session call has a default. A
real ``zsgd worker`` process joins it through the real handshake, with the run secret, and trains against it.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest

from helpers import reap, start_worker
from zsgd.runtime.server.service import Service
from zsgd.wire import protocol


class CountingService(Service):
    """Serves the initial weights for ever and counts the updates that come back: the smallest complete service."""

    def __init__(self, broker, w0: np.ndarray, _opt_state) -> None:
        self.b, self.w, self.updates = broker, w0, 0

    def worker_ready(self, peer) -> None:
        self.b.session.send(peer, protocol.weights_message(self.b.run, self.updates, self.w))

    def on_update(self, peer, msg) -> None:
        self.updates += 1
        peer.steps += 1
        self.b.ledger.applied(self.b.elapsed, version=self.updates, n_samples=int(msg.meta["n_samples"]), worker=peer.worker)
        self.b.after_update()
        self.b.session.send(peer, protocol.weights_message(self.b.run, self.updates, self.w))

    @property
    def version(self) -> int:
        return self.updates

    @property
    def weights(self) -> np.ndarray:
        return self.w

    def snapshot(self) -> np.ndarray:
        return self.w.copy()


def test_a_service_must_define_what_it_does_with_an_update():
    with pytest.raises(NotImplementedError):
        Service().on_update(None, None)
    assert Service().checkpoint_state() is None and Service().summary() == {} and Service().all_serving()


@pytest.mark.slow
def test_a_toy_service_serves_a_real_worker(tmp_path, no_orphans):
    from zsgd.core.config import TrainConfig
    from zsgd.core.problem import Problem
    from zsgd.output.metrics import MetricsWriter
    from zsgd.runtime.run_options import NetworkOptions
    from zsgd.runtime.server.broker import Broker, BrokerOptions
    from zsgd.wire.auth import new_token
    from zsgd.wire.security import write_secret_json

    cfg = TrainConfig(model="logreg", data="embedded", steps=60, batch_size=32, name="toy").validate()
    token = new_token()
    keys = tmp_path / "keys"
    keys.mkdir(mode=0o700)
    write_secret_json(keys / "run.json", {"token": token})
    opts = BrokerOptions(network=NetworkOptions(heartbeat=0.2, timeout=1.5), n_workers=1, token=token)
    made: list[CountingService] = []

    def factory(broker, w0, opt_state):  # the one line that plugs a service into a broker
        made.append(CountingService(broker, w0, opt_state))
        return made[-1]

    with MetricsWriter(tmp_path / "metrics.jsonl") as metrics:
        broker = Broker(cfg, Problem.from_config(cfg), opts, tmp_path, metrics, service=factory)
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
    assert made[0].updates == result["updates"] == 60 and result["stop_reason"] == "reached 60 updates"
    assert result["rejected_messages"] == 0 and result["workers"]["0"]["steps"] == 60
