"""``zsgd run`` and ``zsgd broker``: a broker plus the workers it launches.

The order matters for "no orphans, no leaked ports": bind first (a port in
use fails before anything starts), then launch, then serve; whatever
happens (normal end, error, Ctrl-C) the ``finally`` sends LEAVE, reaps every
child and closes the socket before the summary is written.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from zsgd.broker import Broker, BrokerOptions
from zsgd.config import TrainConfig, write_config
from zsgd.errors import ZsgdError
from zsgd.metrics import MetricsWriter
from zsgd.rundir import create_run_dir, write_json


@dataclass
class RunOptions:
    n_proc: int = 2
    algo: str = "async"
    host: str | None = None  # None: loopback, or with --remote the advertised address
    port: int = 0
    heartbeat: float = 1.0
    timeout: float = 3.0
    staleness_lr: str | bool = "off"
    compress: str = "none"
    checkpoint_every: int = 500
    eval_interval: float = 0.0
    evaluator: bool = True
    expect_workers: int | None = None  # broker-only mode: workers started by hand
    inject_latency: str | None = None  # emulation: same specs as zsgd sim
    inject_bandwidth: str | None = None
    inject_loss: str | None = None
    stragglers: str | None = None
    remote: str | None = None  # hosts file (zsgd.remote); its workers take the ids after the local ones
    advertise: str | None = None
    allow_partial: bool = False
    ssh: dict | None = None  # zsgd.ssh.SshOptions fields
    secure: bool = False  # CURVE even on loopback (always on beyond it)
    keys_dir: str | None = None  # from 'zsgd keys generate'
    remote_workers: int = 0  # set once the hosts have answered
    show: bool = True

    def validate(self) -> "RunOptions":
        from zsgd.algorithms import parse_algo

        from zsgd.algorithms import parse_staleness_lr
        from zsgd.compression import make_codec

        parse_algo(self.algo)
        self.staleness_lr = parse_staleness_lr(self.staleness_lr)
        if self.staleness_lr == "per-coordinate" and not self.algo.startswith(("async", "ssp")):
            raise ZsgdError(f"--staleness-lr per-coordinate needs --algo async or ssp:S, not {self.algo!r}")
        make_codec(self.compress, 1)
        self.emulator(0)  # parses every injected spec now, so a typo fails before anything starts
        if self.n_proc < 0 or (self.n_proc == 0 and not self.expect_workers and not self.remote):
            raise ZsgdError(f"--n-proc must be >= 1, got {self.n_proc}")
        if not 0 <= self.port <= 65535:
            raise ZsgdError(f"--port must be in 0..65535, got {self.port}")
        if self.heartbeat <= 0 or self.timeout <= self.heartbeat:
            raise ZsgdError("--timeout must be longer than --heartbeat (3-5 heartbeats is the usual choice)")
        if self.eval_interval < 0:
            raise ZsgdError(f"--eval-interval must be >= 0, got {self.eval_interval}")
        if self.checkpoint_every < 0:
            raise ZsgdError(f"--checkpoint-every must be >= 0, got {self.checkpoint_every}")
        return self

    def emulator(self, seed: int):
        """A LinkEmulator when any network condition or straggler is injected, else None."""
        if not (self.inject_latency or self.inject_bandwidth or self.inject_loss or self.stragglers):
            return None
        from zsgd.emulation import LinkEmulator, Network, parse_bandwidth, parse_delay, parse_loss, parse_stragglers

        latency = parse_delay(self.inject_latency or "0", "--inject-latency")
        net = Network(latency_up=latency, latency_down=latency, bandwidth=parse_bandwidth(self.inject_bandwidth or "inf"),
                      loss=parse_loss(self.inject_loss or "0"))
        stragglers = parse_stragglers(self.stragglers) if self.stragglers else None
        return LinkEmulator(net, stragglers, n_workers=self.n_workers, seed=seed)

    @property
    def n_workers(self) -> int:
        return self.expect_workers or self.n_proc + self.remote_workers


def run_distributed(cfg: TrainConfig, opts: RunOptions, out: str | Path | None = None, resume_dir: str | Path | None = None) -> dict[str, Any]:
    from zsgd.live import stderr_console
    from zsgd.live_run import RunView
    from zsgd.train import Problem

    cfg.validate()
    opts.validate()
    from zsgd.access import prepare_access

    access = prepare_access(opts)  # probes remote hosts; a bad host fails here, before anything starts
    resume = None
    if resume_dir is not None:
        from zsgd.checkpoint import load_checkpoint

        resume = load_checkpoint(Path(resume_dir))
        run_dir = Path(resume_dir)
    else:
        run_dir = create_run_dir(out, cfg.name)
    problem = Problem.from_config(cfg)
    ds = problem.dataset
    if opts.show:
        stderr_console.print(f"data: [bold]{ds.name}[/] ({ds.source}), {len(ds.y_train):,} train / {len(ds.y_test):,} test; "
                             f"model: [bold]{cfg.model}[/] ({problem.model.n_params:,} parameters); algorithm: [bold]{opts.algo}[/]")
    resolved = cfg.to_dict() | {"mode": "run", "run": {k: v for k, v in asdict(opts).items() if k != "show"}, "data_source": ds.source,
                                "n_params": problem.model.n_params}
    if resume is None:
        write_config(run_dir / "config.yaml", resolved)
    bopts = BrokerOptions(algo=opts.algo, n_workers=opts.n_workers, bind=access.bind(opts.port), curve=access.broker_curve(), heartbeat=opts.heartbeat,
                          timeout=opts.timeout, staleness_lr=opts.staleness_lr, compress=opts.compress, checkpoint_every=opts.checkpoint_every,
                          eval_every_s=opts.eval_interval, emulator=opts.emulator(cfg.seed))
    with MetricsWriter(run_dir / "metrics.jsonl") as metrics:
        broker = Broker(cfg, problem, bopts, run_dir, metrics, resume=resume, run_id=resume[2].get("run") if resume else None)
        metrics.write("start", broker.elapsed, mode="run", algo=opts.algo, n_workers=opts.n_workers, address=broker.address,
                      model=cfg.model, data=ds.name, n_params=problem.model.n_params, resumed=resume is not None)
        if opts.show:
            stderr_console.print(f"broker listening on [bold]{broker.address}[/]{' (CURVE)' if access.secure else ''}; run directory {run_dir}")
        if access.secure and opts.expect_workers and not opts.keys_dir:
            access.write_client_files(run_dir, opts.expect_workers)
        launcher = access.launchers(broker, run_dir, opts.heartbeat, opts.timeout, opts.show)
        started = time.monotonic()
        try:
            for i in range(opts.n_proc):
                launcher.local.start(i)
            for i in range(opts.n_proc, opts.n_proc + opts.remote_workers):
                launcher.remote.start(i)
            if opts.evaluator:
                launcher.local.start(0, role="evaluator")
            with RunView(f"{opts.algo} x{opts.n_workers}", problem.stop_rule(cfg).total_updates, enabled=opts.show) as view:
                def tick(b: Broker) -> None:
                    view.update(b)
                    _check_children(b, launcher, opts, started)

                broker.serve(on_tick=tick)
        finally:
            launcher.stop_all(grace=2 * opts.heartbeat + 1)
        broker.final_evaluation()
        summary = broker.summary() | {"mode": "run", "algo": opts.algo, "n_workers": opts.n_workers, "model": cfg.model,
                                      "data": ds.name, "data_source": ds.source, "n_params": problem.model.n_params}
        summary["samples_per_s"] = summary["samples"] / summary["wall_s"] if summary["wall_s"] else 0.0
        metrics.write("end", broker.elapsed, updates=summary["updates"], samples=summary["samples"], test_loss=summary["test_loss"],
                      test_acc=summary["test_accuracy"], reason=summary["stop_reason"])
    from zsgd.rundir import save_arrays

    save_arrays(run_dir / "weights.npz", problem.model.state_dict(broker.algo.w))
    write_json(run_dir / "summary.json", summary)
    from zsgd.plots import plot_run

    plot_run(run_dir)
    summary["run_dir"] = str(run_dir)
    return summary


def _check_children(broker: Broker, launcher, opts: RunOptions, started: float) -> None:
    """Abort early, with the reason, if every launched worker died before joining."""
    if not launcher.children or broker.state.updates > 0:
        return
    workers = [c for c in launcher.children if c.name.startswith("worker")]
    if workers and all(c.returncode not in (None, 0) for c in workers):
        tail = workers[0].log_tail()
        broker.state.stop_reason = "all workers failed to start"
        raise ZsgdError(f"all {len(workers)} workers exited before training (e.g. {workers[0].name}, exit {workers[0].returncode}: {tail})")
