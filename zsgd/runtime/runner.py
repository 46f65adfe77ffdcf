"""``zsgd run`` and ``zsgd broker``: a broker plus the workers it launches.

The order matters for "no orphans, no leaked ports": bind first (a port in
use fails before anything starts), then launch, then serve; whatever
happens (normal end, error, Ctrl-C) the ``finally`` sends LEAVE, reaps every
child and closes the socket before the summary is written.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from zsgd.broker import Broker, BrokerOptions
from zsgd.core.config import TrainConfig, write_config
from zsgd.errors import ZsgdError
from zsgd.core.schedule import check_schedule_applies, resolve_lr_schedule
from zsgd.output.metrics import MetricsWriter
from zsgd.output.rundir import create_run_dir, write_json


DECENTRALIZED_FLAGS = ("topology", "alpha0", "mu", "rho", "rho_scaling", "primal_steps", "gamma")


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
    compress_replies: str = "none"  # broker->worker weight deltas through this codec (zsgd.compression.delta)
    servers: int = 1  # --servers K: the parameter vector split over K server processes (zsgd.runtime.sharded)
    checkpoint_every: int = 500
    eval_interval: float = 0.0
    evaluator: bool = True
    tensorboard: bool = False  # also write TensorBoard event files (tensorboardX)
    expect_workers: int | None = None  # broker-only mode: workers started by hand
    inject_latency: str | None = None  # emulation: same specs as zsgd sim
    inject_bandwidth: str | None = None
    inject_loss: str | None = None
    stragglers: str | None = None
    remote: str | None = None  # hosts file (zsgd.remote.launcher); its workers take the ids after the local ones
    advertise: str | None = None
    allow_partial: bool = False
    ssh: dict | None = None  # zsgd.remote.ssh.SshOptions fields
    secure: bool = False  # CURVE even on loopback (always on beyond it)
    keys_dir: str | None = None  # from 'zsgd keys generate'
    remote_workers: int = 0  # set once the hosts have answered
    launcher: str = "local"  # "local", "ssh" (with --remote) or "slurm" (workers as one srun step: zsgd.runtime.slurm)
    slurm_request: int | None = None  # workers asked for under Slurm (None: every CPU of the allocation but the broker's)
    slurm_workers: int = 0  # set once the allocation is read
    auto_scale: list[str] = field(default_factory=list)  # defaulted hyper-parameters to scale to the workers (zsgd.core.scaling)
    # decentralized algorithms (dsgd, dsgt, cadmm): the graph and the rule's hyper-parameters
    # (None: the defaults of DecentralizedParams; refused with a centralized --algo)
    topology: str | None = None
    alpha0: float | None = None
    mu: float | None = None
    rho: float | None = None
    rho_scaling: float | None = None
    primal_steps: int | None = None
    gamma: float | None = None
    show: bool = True

    @property
    def decentralized(self) -> bool:
        from zsgd.decentralized.rules import is_decentralized

        return is_decentralized(self.algo)

    def decentralized_params(self):
        """The rule's ``DecentralizedParams`` from the flags that were given (validated)."""
        from zsgd.decentralized.rules import DecentralizedParams

        given = {k: getattr(self, k) for k in DECENTRALIZED_FLAGS[1:] if getattr(self, k) is not None}
        return DecentralizedParams(**given).validate()

    def _validate_decentralized(self) -> None:
        from zsgd.decentralized.rules import DECENTRALIZED, PARAMS_OF

        if self.algo not in DECENTRALIZED:
            raise ZsgdError(f"bad algorithm {self.algo!r}: {self.algo.partition(':')[0]} takes its options as flags (--topology, --alpha0, --rho ...)")
        for k in DECENTRALIZED_FLAGS[1:]:
            if getattr(self, k) is not None and k not in PARAMS_OF[self.algo]:
                raise ZsgdError(f"--{k.replace('_', '-')} is a parameter of {', '.join(a for a, p in PARAMS_OF.items() if k in p)}, not {self.algo}")
        self.decentralized_params()
        if self.staleness_lr not in ("off", False, None):
            raise ZsgdError(f"--staleness-lr applies to centralized algorithms, not {self.algo}")
        if self.compress_replies != "none":
            raise ZsgdError(f"--compress-replies applies to the broker's replies; {self.algo} has none (--compress codes its peer messages)")

    def validate(self) -> "RunOptions":
        from zsgd.algorithms import parse_algo

        from zsgd.algorithms import parse_staleness_lr
        from zsgd.compression import make_codec

        # Decentralized algorithms are dispatched here, not by parse_algo: that one names
        # the server algorithms, which zsgd sim's centralized grid also accepts.
        if self.decentralized:
            self._validate_decentralized()
        else:
            parse_algo(self.algo)
            given = [k for k in DECENTRALIZED_FLAGS if getattr(self, k) is not None]
            if given:
                raise ZsgdError(f"--{given[0].replace('_', '-')} applies to decentralized algorithms (dsgd, dsgt, cadmm), not {self.algo}")
        self.staleness_lr = parse_staleness_lr(self.staleness_lr)
        if self.staleness_lr == "per-coordinate" and not self.algo.startswith(("async", "ssp")):
            raise ZsgdError(f"--staleness-lr per-coordinate needs --algo async or ssp:S, not {self.algo!r}")
        make_codec(self.compress, 1)
        make_codec(self.compress_replies, 1)
        self.emulator(0)  # parses every injected spec now, so a typo fails before anything starts
        if self.n_proc < 0 or (self.n_proc == 0 and not self.expect_workers and not self.remote and self.launcher != "slurm"):
            raise ZsgdError(f"--n-proc must be >= 1, got {self.n_proc}")
        from zsgd.runtime.launch import max_local_workers

        cap, why = max_local_workers()
        if self.n_proc > cap:
            raise ZsgdError(f"--n-proc {self.n_proc:,} is more local workers than this machine can run (at most {cap} for {why}); "
                            f"use 'zsgd sim --workers {self.n_proc}' to study that many, or --remote to add machines")
        if not 0 <= self.port <= 65535:
            raise ZsgdError(f"--port must be in 0..65535, got {self.port}")
        from zsgd.wire.link import check_intervals

        check_intervals(self.heartbeat, self.timeout)
        if not self.eval_interval >= 0 or self.eval_interval == float("inf"):
            raise ZsgdError(f"--eval-interval must be a finite number of seconds >= 0, got {self.eval_interval}")
        if self.checkpoint_every < 0:
            raise ZsgdError(f"--checkpoint-every must be >= 0, got {self.checkpoint_every}")
        from zsgd.core.ranges import check_servers

        check_servers(self.servers)
        if self.servers > 1 and self.decentralized:
            raise ZsgdError(f"--servers splits the central model over server processes; {self.algo} has no central model")
        return self

    def emulator(self, seed: int):
        """A LinkEmulator when any network condition or straggler is injected, else None."""
        from zsgd.runtime.emulation import emulator_from_specs

        return emulator_from_specs(*self.emulation_specs(), n_workers=self.n_workers, seed=seed)

    def emulation_specs(self) -> tuple[str | None, str | None, str | None, str | None]:
        return self.inject_latency, self.inject_bandwidth, self.inject_loss, self.stragglers

    @property
    def n_workers(self) -> int:
        return self.expect_workers or self.n_proc + self.remote_workers + self.slurm_workers


def run_distributed(cfg: TrainConfig, opts: RunOptions, out: str | Path | None = None, resume_dir: str | Path | None = None) -> dict[str, Any]:
    from zsgd.output.live import stderr_console
    from zsgd.output.live_run import RunView
    from zsgd.core.problem import Problem

    cfg.validate()
    opts.validate()
    cfg = resolve_lr_schedule(cfg, opts.algo)
    check_schedule_applies(cfg.lr_schedule, opts.algo)
    from zsgd.runtime.access import prepare_access

    access = prepare_access(opts)  # probes remote hosts; a bad host fails here, before anything starts
    if access.plan is not None and access.plan.n_servers > opts.servers - 1:
        raise ZsgdError(f"{opts.remote} places {access.plan.n_servers} range servers (servers=) but --servers {opts.servers} has "
                        f"{opts.servers - 1} besides the coordinator's range; give --servers {access.plan.n_servers + 1}")
    if resume_dir is None:
        from zsgd.core.scaling import scale_for_workers

        cfg, scaled = scale_for_workers(cfg, opts.algo, opts.n_workers, set(opts.auto_scale))
        if scaled and opts.show:
            stderr_console.print(scaled)
    resume = None
    topology = None
    if opts.decentralized:
        from zsgd.decentralized.topology import parse_topology

        if resume_dir is not None:
            raise ZsgdError(f"--resume: {opts.algo} runs keep no checkpoint (each node holds its own state); start a new run")
        topology = parse_topology(opts.topology or "ring", opts.n_workers, cfg.seed)  # a bad graph fails before anything starts
    if resume_dir is not None:
        from zsgd.runtime.checkpoint import load_checkpoint

        resume = load_checkpoint(Path(resume_dir))
        run_dir = Path(resume_dir)
        from zsgd.output.metrics import drop_events_after

        drop_events_after(run_dir / "metrics.jsonl", int(resume[2]["updates"]))  # they are replayed from the checkpoint
    else:
        run_dir = create_run_dir(out, cfg.name)
    problem = Problem.from_config(cfg)
    problem.check_fits(cfg, opts.n_workers)
    if opts.servers > 1:
        from zsgd.core.ranges import check_servers

        check_servers(opts.servers, problem.model.n_params)
    ds = problem.dataset
    if resume_dir is not None:
        import yaml

        problem.check_resume(yaml.safe_load((Path(resume_dir) / "config.yaml").read_text()) or {}, str(resume_dir))
    if opts.show:
        stderr_console.print(f"data: [bold]{ds.name}[/] ({ds.source}), {len(ds.y_train):,} train / {len(ds.y_test):,} test; "
                             f"model: [bold]{cfg.model}[/] ({problem.model.n_params:,} parameters); algorithm: [bold]{opts.algo}[/]")
    resolved = cfg.to_dict() | {"mode": "run", "run": {k: v for k, v in asdict(opts).items() if k != "show"}, "data_source": ds.source,
                                "n_params": problem.model.n_params} | problem.data_fields()
    write_config(run_dir / "config.yaml", resolved)  # on --resume too: it records a changed --n-proc or stop rule
    bopts = BrokerOptions(algo=opts.algo, n_workers=opts.n_workers, bind=access.bind(opts.port), curve=access.broker_curve(), heartbeat=opts.heartbeat,
                          timeout=opts.timeout, staleness_lr=opts.staleness_lr, compress=opts.compress, compress_replies=opts.compress_replies,
                          checkpoint_every=opts.checkpoint_every, servers=opts.servers, emulation=opts.emulation_specs(),
                          eval_every_s=opts.eval_interval, emulator=opts.emulator(cfg.seed))
    with MetricsWriter(run_dir / "metrics.jsonl", tensorboard=run_dir / "tensorboard" if opts.tensorboard else None) as metrics:
        if topology is not None:
            from zsgd.runtime.relay import relay_service

            bopts.checkpoint_every = 0
            broker = Broker(cfg, problem, bopts, run_dir, metrics, service=relay_service(opts.algo, topology, _resolved_params(opts, cfg)))
        else:
            from zsgd.broker import parameter_server
            from zsgd.runtime.sharded import sharded_parameter_server

            broker = Broker(cfg, problem, bopts, run_dir, metrics, resume=resume, run_id=resume[2].get("run") if resume else None,
                            service=sharded_parameter_server if opts.servers > 1 else parameter_server)
        metrics.write("start", broker.elapsed, mode="run", algo=opts.algo, n_workers=opts.n_workers, address=broker.address,
                      model=cfg.model, data=ds.name, n_params=problem.model.n_params, resumed=resume is not None)
        if opts.show:
            stderr_console.print(f"broker listening on [bold]{broker.address}[/]{' (CURVE)' if access.secure else ''}; run directory {run_dir}")
        if access.secure and opts.expect_workers and not opts.keys_dir:
            access.write_client_files(run_dir, opts.expect_workers)
        launcher = access.launchers(broker, run_dir, opts.heartbeat, opts.timeout, opts.show)
        started = time.monotonic()
        interrupted = False
        from zsgd.runtime.stop_signal import stop_on_sigterm

        try:
            stop_on_sigterm(broker, opts.show)  # a time limit's SIGTERM: checkpoint, summary, clean exit
            if opts.servers > 1 and access.keys is not None:
                for i in range(opts.n_workers):  # the range servers' allow-lists are fixed when they start
                    access.keys.bundle(f"worker-{i}")
            placed = access.plan.server_placement() if access.plan is not None else {}
            for i in range(1, opts.servers):
                (launcher.remote if i in placed else launcher.local).start(i, role="server")
            for i in range(opts.n_proc):
                launcher.local.start(i)
            for i in range(opts.n_proc, opts.n_proc + opts.remote_workers):
                launcher.remote.start(i)
            if launcher.slurm is not None:
                launcher.slurm.start_step(opts.slurm_workers)
            if opts.evaluator:
                launcher.local.start(0, role="evaluator")
            with RunView(f"{opts.algo} x{opts.n_workers}", problem.stop_rule(cfg).total_updates, enabled=opts.show,
                         language_model=problem.is_language_model) as view:
                def tick(b: Broker) -> None:
                    view.update(b)
                    _check_children(b, launcher, opts, started)

                try:
                    broker.serve(on_tick=tick)
                except KeyboardInterrupt:
                    # Ctrl-C (or SIGTERM from a launcher): the broker has checkpointed on its way
                    # out; write the summary of what was done, then exit as interrupted.
                    interrupted = True
                    broker.ledger.stop("interrupted")
        finally:
            launcher.stop_all(grace=2 * opts.heartbeat + 1)
            stop_on_sigterm(None)
        broker.final_evaluation()
        summary = broker.summary() | {"mode": "run", "algo": opts.algo, "n_workers": opts.n_workers, "model": cfg.model,
                                      "data": ds.name, "data_source": ds.source, "n_params": problem.model.n_params}
        metrics.write("end", broker.elapsed, updates=summary["updates"], samples=summary["samples"], test_loss=summary["test_loss"],
                      test_acc=summary["test_accuracy"], reason=summary["stop_reason"])
    from zsgd.output.rundir import save_arrays

    save_arrays(run_dir / "weights.npz", problem.model.state_dict(broker.service.weights))
    write_json(run_dir / "summary.json", summary)
    from zsgd.output.plots import plot_run

    plot_run(run_dir)
    summary["run_dir"] = str(run_dir)
    if interrupted:
        raise KeyboardInterrupt
    if broker.failed:
        from zsgd.runtime.relay import RunStopped

        raise RunStopped(f"run stopped early: {summary['stop_reason']} (summary of {summary['updates']} rounds in {run_dir})")
    return summary


def _resolved_params(opts: RunOptions, cfg: TrainConfig):
    """The rule's parameters with alpha0 (the problem's lr) and gamma filled in, as the nodes will use them."""
    from dataclasses import replace

    params = opts.decentralized_params()
    return replace(params, alpha0=params.alpha0 or cfg.lr, gamma=params.resolved_gamma(opts.compress))


def _check_children(broker: Broker, launcher, opts: RunOptions, started: float) -> None:
    """Abort early, with the reason, if every launched worker died before joining; stop (with a
    checkpoint) when the workers' srun step has ended, since none of them can come back."""
    step = launcher.slurm.children[0] if launcher.slurm is not None and launcher.slurm.children else None
    if step is not None and step.returncode is not None and broker.ledger.updates > 0 and broker.ledger.stop_reason is None:
        broker.ledger.stop(f"the workers' srun step ended (exit {step.returncode}: {step.log_tail(2) or 'no output'})")
        return
    servers = [c for c in launcher.children if c.name.startswith("server") and c.returncode not in (None, 0)]
    if servers and broker.ledger.stop_reason is None and not broker.service.all_serving():
        broker.ledger.stop(f"range server {servers[0].name} failed to start")
        raise ZsgdError(f"range server {servers[0].name} exited before serving (exit {servers[0].returncode}: {servers[0].log_tail()})")
    if not launcher.children or broker.ledger.updates > 0:
        return
    workers = [c for c in launcher.children if c.name.startswith("worker")]
    if workers and all(c.returncode not in (None, 0) for c in workers):
        tail = workers[0].log_tail()
        broker.ledger.stop("all workers failed to start")
        raise ZsgdError(f"all {len(workers)} workers exited before training (e.g. {workers[0].name}, exit {workers[0].returncode}: {tail})")
