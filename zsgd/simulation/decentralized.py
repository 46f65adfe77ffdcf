"""Decentralized runs in virtual time: real gradients, simulated clock.

The round driver (``driver.py``) computes every node's real update; this
module adds the clock, the network and the metrics. Each node waits for its
own neighbours only, never for a global barrier, which is how the runtime's
nodes (and any synchronous Jacobi implementation) behave. With ``ready_i``
the time node i's round-r value is ready and sent::

    arrival(i -> j) = ready_i + link delay of the message
    start_j         = max(ready_j, max over j's neighbours i of arrival(i -> j))
    ready_j        <- start_j + compute_j
    compute_j       = (gradient steps of the round) x compute sample x straggler factor(j, start_j)
    link delay      = latency sample + (k+1) x message bytes / bandwidth (+ resends if lost)

and round r ends (its metrics' time) when the last node has finished it.
With identical nodes this is ``compute + slowest delay`` per round; with a
straggler its neighbours are held back, and the straggler's compute falls on
the critical path every other round on a ring, not every round (the period is
the largest cycle mean of this max-plus system). A real emulated dsgd run
confirms it: `tests/test_fidelity.py`.

where k is the message's place in node i's send queue: a node's messages
leave one after another over its own link (degree-many copies of the model
share one NIC), which is why a complete graph costs more time per round than
a ring. Peer links are one hop (node to node); the network's per-worker
latency overrides apply to the sending node. A node's compute and its own
communication of a round do not overlap (every rule needs its neighbours'
values of the round before its step).

Message sizes are exact: ``protocol.message_nbytes`` of the PEER message that
carries each payload, compressed by the arm's codec if it has one.

Metrics use the schema of real runs (``metrics.jsonl`` events ``start``,
``worker``, ``update`` per round, ``train``, ``eval`` of the nodes' *average*
model, ``end``; ``summary.json``), with extra fields ``consensus_error`` and
``bytes_total`` (cumulative bytes on the wire) on ``train`` and ``eval``, so
``zsgd plot`` draws a decentralized arm beside a centralized one. One
"update" is one round of all nodes.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from zsgd.core.config import TrainConfig
from zsgd.core.ledger import run_header
from zsgd.decentralized.driver import DecentralizedRound, RoundResult, average, consensus_error, eval_every_rounds
from zsgd.decentralized.peer import PeerPayload
from zsgd.wire import protocol
from zsgd.decentralized.rules import DECENTRALIZED, DecentralizedParams, GradFn, node_gradient, rule_class
from zsgd.decentralized.topology import Topology, parse_topology
from zsgd.errors import ZsgdError
from zsgd.output.metrics import MetricsWriter
from zsgd.simulation import interrupt
from zsgd.network import Delay, LinkDraws, Measured, Network, StragglerSpec
from zsgd.errors import ProtocolError
from zsgd.algorithms.schedules import check_schedule_applies, resolve_lr_schedule
from zsgd.simulation.simulator import ProgressFn, SimResult, Workload, record_arm


@dataclass
class DecentralizedOptions:
    """One decentralized arm: rule, graph, hyper-parameters and the world it runs in."""

    algo: str = "dsgd"
    n_workers: int = 8
    topology: str = "ring"
    params: DecentralizedParams = field(default_factory=DecentralizedParams)
    network: Network = field(default_factory=Network)
    compute: Delay | Measured = field(default_factory=Measured)
    stragglers: StragglerSpec | None = None
    compress: str = "none"
    target: float | None = None  # accuracy whose first crossing is reported (time_to_target_s)
    calibration_steps: int = 5

    def validate(self) -> "DecentralizedOptions":
        from zsgd.compression import make_codec

        if self.algo not in DECENTRALIZED:
            raise ZsgdError(f"unknown decentralized algorithm {self.algo!r}; choose one of {', '.join(DECENTRALIZED)}")
        if isinstance(self.n_workers, bool) or not isinstance(self.n_workers, int) or self.n_workers < 1:
            raise ZsgdError(f"workers must be a whole number >= 1, got {self.n_workers!r}")
        self.params.validate()
        make_codec(self.compress, 1)
        if self.target is not None and not 0 < self.target <= 1:
            raise ZsgdError(f"target must be in (0, 1], got {self.target}")
        return self

    def resolved(self, cfg: TrainConfig) -> "DecentralizedOptions":
        """A copy with ``alpha0`` (the problem's lr) and ``gamma`` defaults filled in, so
        config.yaml and the summary show the values used."""
        if "alpha0" not in self.params.for_algo(self.algo):
            return self
        return replace(self, params=replace(self.params, alpha0=self.params.alpha0 or cfg.lr,
                                            gamma=self.params.resolved_gamma(self.compress)))

    def graph(self, seed: int) -> Topology:
        return parse_topology(self.topology, self.n_workers, seed)

    @classmethod
    def like(cls, world: Any, algo: str, topology: str, params: DecentralizedParams) -> "DecentralizedOptions":
        """The decentralized arm of a centralized arm's world (``SimOptions``: workers, network, compute, stragglers, codec)."""
        if world.failures is not None:
            raise ZsgdError(f"failures are not modelled for {algo} arms (rounds are synchronous); drop --failures for them")
        if world.compress_replies != "none":
            raise ZsgdError(f"--compress-replies applies to the broker's replies; {algo} has none (--compress codes its peer messages)")
        if world.staleness_lr not in ("off", False, None):
            raise ZsgdError(f"--staleness-lr applies to centralized algorithms, not {algo}")
        return cls(algo=algo, n_workers=world.n_workers, topology=topology, params=params, network=world.network, compute=world.compute,
                   stragglers=world.stragglers, compress=world.compress, target=world.target,
                   calibration_steps=world.calibration_steps).validate()

    def describe(self) -> dict[str, Any]:
        return {"algo": self.algo, "n_workers": self.n_workers, "topology": self.topology, **self.params.for_algo(self.algo),
                **self.network.describe(), "compute": str(self.compute),
                "stragglers": str(self.stragglers) if self.stragglers else "none", "compress": self.compress}


def _grad_fns(cfg: TrainConfig, workload: Workload, n: int, add_weight_decay: bool) -> tuple[list[GradFn], list[Any]]:
    """Node i's gradient: worker i's shard and batch stream (as in centralized arms), clipped, + weight decay."""
    from zsgd.algorithms.worker import WorkerStep

    steppers = [WorkerStep(workload.model, x, y, cfg.batch_size, cfg.seed, i) for i, (x, y) in enumerate(workload.shards(n))]
    return [node_gradient(s, cfg.clip_norm, cfg.weight_decay, add_weight_decay) for s in steppers], steppers


class PeerMessageSizes:
    """Exact bytes of the PEER message that carries a payload to a neighbour (``protocol.message_nbytes``):
    the round driver's ``sizer``, since the decentralized package does not know the wire format.

    The header differs only in small integers; sizes are cached by codec, array sizes and the digits
    of the numbers in it, so a 1000-node run does not JSON-encode every message."""

    def __init__(self, run: str = "0" * 12) -> None:
        self.run = run
        self._cache: dict[tuple[str, tuple[int, ...], int, int], int] = {}

    def __call__(self, p: PeerPayload, to: int) -> int:
        key = (p.codec, tuple(int(a.nbytes) for a in p.arrays.values()), len(str(p.round)), len(str(to)) + len(str(p.sender)))
        n = self._cache.get(key)
        if n is None:
            n = self._cache[key] = protocol.message_nbytes(protocol.peer_message(self.run, p.sender, to, p.round, p.arrays,
                                                                                 codec=p.codec))
        return n


class DecentralizedSimulation:
    """One decentralized arm in virtual time; ``run()`` writes metrics and returns a ``SimResult``."""

    def __init__(self, cfg: TrainConfig, opts: DecentralizedOptions, workload: Workload, metrics: MetricsWriter,
                 progress: ProgressFn | None = None) -> None:
        from zsgd.nn.optim import make_optimizer

        cfg = resolve_lr_schedule(cfg, opts.algo)
        check_schedule_applies(cfg.lr_schedule, opts.algo)
        self.cfg, self.opts, self.wl, self.metrics, self.progress = cfg, opts.validate().resolved(cfg), workload, metrics, progress
        self.n = n = opts.n_workers
        self.model = workload.model
        self.topology = opts.graph(cfg.seed)
        self.n_train = len(workload.problem.dataset.y_train)
        self.eval_rounds = eval_every_rounds(cfg, workload.problem.stop_rule(cfg), opts.algo, opts.params, n, self.n_train)
        self.ledger = workload.problem.ledger(cfg, emit=metrics.write, eval_every=self.eval_rounds)
        self.ledger.diverge_hint = rule_class(opts.algo).diverge_hint
        fns, self.steppers = _grad_fns(cfg, workload, n, add_weight_decay=opts.algo != "cadmm")

        def optimizer(_i: int) -> Any:  # cadmm's local solver: the problem's optimizer (it applies weight decay)
            return make_optimizer(cfg.optimizer, self.model.n_params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)

        self.driver = DecentralizedRound.build(opts.algo, self.topology, workload.w0, fns, opts.params, lr=cfg.lr,
                                               compress=opts.compress, seed=cfg.seed, optimizer_factory=optimizer,
                                               sizer=PeerMessageSizes())
        self.compute, self.compute_s = workload.compute_model(opts.compute, opts.calibration_steps)
        self.stragglers = opts.stragglers.assign(n, cfg.seed) if opts.stragglers else None
        self.rng_compute = np.random.default_rng(np.random.SeedSequence([cfg.seed & 0xFFFFFFFF, 0xDEC]).spawn(2)[0])
        self.links = LinkDraws(cfg.seed)  # each node's link, as the relay of zsgd run --inject-latency draws it
        self.net: Network = opts.network
        self.now = 0.0
        self.ready = np.zeros(n)  # when each node's value of the current round is ready (and sent)
        self.bytes = 0
        self.w_steps, self.w_samples = [0] * n, [0] * n
        self.consensus = math.nan
        self.evals: list[tuple[float, int, float]] = []
        self.time_to_target: float | None = None
        self.grad_s = self.eval_s = 0.0

    @property
    def rounds(self) -> int:
        return self.ledger.updates

    @property
    def samples(self) -> int:
        return self.ledger.samples

    # -- one round ---------------------------------------------------------------
    def _round_end(self, res: RoundResult) -> float:
        """Advance every node's ready time through the round just computed; the time the last one finishes it."""
        ready = self.ready
        start = ready.copy()
        queued = [0] * self.n
        for s in res.sent:  # in each sender's queue order: a node's messages share its link
            queued[s.sender] += s.nbytes
            arrival = ready[s.sender] + self.net.delay(s.sender, True, queued[s.sender], self.links)
            start[s.to] = max(start[s.to], arrival)
        for i, st in enumerate(res.stats):
            c = sum(self.compute.sample(self.rng_compute) for _ in range(st.grad_steps))
            if self.stragglers is not None:
                c *= self.stragglers.factor(i, float(start[i]))
            ready[i] = start[i] + c
        return float(ready.max())

    def _after_round(self, res: RoundResult) -> None:
        self.now = self._round_end(res)
        nbytes = res.nbytes
        self.bytes += nbytes
        for i, s in enumerate(res.stats):
            self.w_steps[i] += s.grad_steps
            self.w_samples[i] += s.samples
        self.ledger.loss(float(np.mean([s.loss for s in res.stats])))
        lr = res.stats[0].lr if res.stats else math.nan

        def train_extra() -> dict[str, Any]:
            self.consensus = self.driver.consensus_error()
            return {"consensus_error": self.consensus, "bytes_total": self.bytes}

        self.ledger.applied(self.now, version=res.round + 1, n_samples=sum(s.samples for s in res.stats), worker=-1, staleness=0,
                            lr=lr, bytes=nbytes, contributors=self.n, train_extra=train_extra)
        if self.ledger.take_eval():
            self._evaluate()
        if self.progress is not None and (self.rounds & 7) == 0:
            self.progress(self.rounds, self.samples, self.now, self.ledger.test_acc)

    def _evaluate(self) -> np.ndarray:
        from zsgd.nn.models import evaluate

        ds = self.wl.problem.dataset
        t0 = time.perf_counter()
        models = self.driver.models()
        xbar = average(models)
        self.consensus = consensus_error(models, xbar)
        test_loss, test_acc = (float(v) for v in evaluate(self.model, xbar, ds.x_test, ds.y_test))
        self.eval_s += time.perf_counter() - t0
        self.evals.append((self.now, self.rounds, test_acc))
        if self.opts.target is not None and self.time_to_target is None and test_acc >= self.opts.target:
            self.time_to_target = self.now
        self.ledger.evaluated(self.now, test_loss, test_acc, consensus_error=self.consensus, bytes_total=self.bytes)
        return xbar

    # -- main loop -----------------------------------------------------------------
    def run(self) -> SimResult:
        real0 = time.perf_counter()
        cfg, ds = self.cfg, self.wl.problem.dataset
        self.metrics.write("start", 0.0, mode="sim", model=cfg.model, data=ds.name, n_params=self.model.n_params,
                           n_train=self.n_train, **(self.opts.describe() | self.topology.describe()), compute_s=self.compute_s,
                           straggler_workers=sorted(self.stragglers.workers) if self.stragglers else [])
        for w in range(self.n):
            self.metrics.write("worker", 0.0, worker=w, role="worker", status="joined", host="sim",
                               neighbours=list(self.topology.neighbours[w]))
        while self.ledger.stop_reason is None:
            if interrupt.requested():  # Ctrl-C or SIGTERM: end as a stop rule would, with a summary
                self.ledger.stop(interrupt.STOP_REASON)
                break
            t0 = time.perf_counter()
            try:
                res = self.driver.run_round()
            except ProtocolError as exc:
                if exc.reason != "non-finite":
                    raise
                self.ledger.diverge("a model is not finite")
                break
            self.grad_s += time.perf_counter() - t0
            self._after_round(res)
        xbar = self._evaluate() if self.ledger.final_eval_needed else average(self.driver.models())
        header = run_header("sim", self.opts.algo, self.n, self.cfg.model, self.wl.problem.dataset, self.model.n_params)
        summary = self.ledger.close(self.now, header, end_fields={"consensus_error": self.consensus, "bytes_total": self.bytes},
                                    **self._summary_extra(time.perf_counter() - real0))
        return SimResult(summary, np.zeros(max(self.rounds, 1), np.int64), self.evals, xbar)

    def _summary_extra(self, real_s: float) -> dict[str, Any]:
        """What a simulated decentralized run's summary has beyond the keys every mode has."""
        v = self.now
        return {
            "rounds": self.rounds, "virtual_s": v, "real_s": real_s, "eval_every_rounds": self.eval_rounds,
            "rejected_messages": 0, "rejected_by_reason": {}, "dropped_updates": {},
            # Every peer message is sent by one node and received by one node: both totals are the
            # same bytes; bytes_total counts each message once (what crossed the network).
            "bytes_sent": self.bytes, "bytes_received": self.bytes, "bytes_total": self.bytes,
            "consensus_error": self.consensus,
            "worker_deaths": 0, "worker_rejoins": 0,
            "target": self.opts.target, "time_to_target_s": self.time_to_target,
            "compute_s": self.compute_s if self.compute_s is not None else self.compute.mean,
            "compute_measured": self.compute_s is not None,
            "compute_calibration_s": self.wl.compute_samples if self.compute_s is not None else None,
            "sim": self.opts.describe() | {"straggler_workers": sorted(self.stragglers.workers) if self.stragglers else []},
            "decentralized": self.topology.describe() | self.opts.params.for_algo(self.opts.algo) | {"compress": self.opts.compress},
            "gradient_real_s": self.grad_s, "eval_real_s": self.eval_s,
            "workers": {str(w): {"host": "sim", "steps": self.w_steps[w], "samples": self.w_samples[w], "mean_staleness": 0.0,
                                 "max_staleness": 0, "incarnations": 1, "degree": len(self.topology.neighbours[w])}
                        for w in range(self.n)},
        }


def run_decentralized_arm(cfg: TrainConfig, opts: DecentralizedOptions, workload: Workload, run_dir: Path,
                          progress: ProgressFn | None = None) -> SimResult:
    """Simulate one decentralized arm into ``run_dir`` (weights.npz holds the average model x_bar)."""
    opts = opts.validate().resolved(cfg)
    cfg = resolve_lr_schedule(cfg, opts.algo)
    return record_arm(run_dir, cfg, opts.describe(), workload,
                      lambda metrics: DecentralizedSimulation(cfg, opts, workload, metrics, progress).run(), workload.calibration_record(opts))
