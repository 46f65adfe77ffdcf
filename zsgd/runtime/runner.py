"""``zsgd run`` and ``zsgd broker``: a broker plus the workers it launches.

The order matters for "no orphans, no leaked ports": bind first (a port in
use fails before anything starts), then launch, then serve. Whatever happens
(normal end, error, Ctrl-C) the broker sends LEAVE and closes its socket on
its way out of ``serve``; the children then end on their own while the final
evaluation, the summary and the plots are written, and the ``finally`` reaps
every one of them before ``run_distributed`` returns or raises.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Callable

from zsgd.runtime.server.broker import Broker, BrokerOptions
from zsgd.core.config import TrainConfig, write_config
from zsgd.core.ledger import run_header
from zsgd.errors import ZsgdError
from zsgd.algorithms.schedules import check_schedule_applies, resolve_lr_schedule
from zsgd.output.metrics import MetricsWriter
from zsgd.output.rundir import create_run_dir, write_json
from zsgd.runtime.launch.base import LOCAL, plan_ranks
from zsgd.runtime.run_options import RunOptions


def run_distributed(cfg: TrainConfig, opts: RunOptions, out: str | Path | None = None, resume_dir: str | Path | None = None) -> dict[str, Any]:
    from zsgd.output.live import stderr_console
    from zsgd.output.live_run import RunView
    from zsgd.core.problem import Problem

    cfg.validate()
    opts.validate()
    algo = opts.server.algo
    cfg = resolve_lr_schedule(cfg, algo)
    check_schedule_applies(cfg.lr_schedule, algo)
    from zsgd.runtime.launch.access import prepare_access

    access = prepare_access(opts)  # probes remote hosts; a bad host fails here, before anything starts
    servers = opts.server.servers
    if access.plan is not None and access.plan.n_servers > servers - 1:
        raise ZsgdError(f"{opts.remote.hosts_file} places {access.plan.n_servers} range servers (servers=) but --servers {servers} has "
                        f"{servers - 1} besides the coordinator's range; give --servers {access.plan.n_servers + 1}")
    if resume_dir is None:
        from zsgd.algorithms.scaling import scale_for_workers

        cfg, scaled = scale_for_workers(cfg, algo, opts.n_workers, set(opts.auto_scale))
        if scaled and opts.output.show:
            stderr_console.print(scaled)
    resume = None
    topology = None
    if opts.server.decentralized:
        from zsgd.decentralized.topology import parse_topology

        if resume_dir is not None:
            raise ZsgdError(f"--resume: {algo} runs keep no checkpoint (each node holds its own state); start a new run")
        topology = parse_topology(opts.decentralized.topology or "ring", opts.n_workers, cfg.seed)  # a bad graph fails before anything starts
    if resume_dir is not None:
        from zsgd.runtime.server.checkpoint import load_checkpoint

        resume = load_checkpoint(Path(resume_dir))
        run_dir = Path(resume_dir)
        from zsgd.output.metrics import drop_events_after

        drop_events_after(run_dir / "metrics.jsonl", int(resume[2]["updates"]))  # they are replayed from the checkpoint
    else:
        run_dir = create_run_dir(out, cfg.name)
    problem = Problem.from_config(cfg)
    problem.check_fits(cfg, opts.n_workers)
    if servers > 1:
        from zsgd.core.ranges import check_servers

        check_servers(servers, problem.model.n_params)
    ds = problem.dataset
    if resume_dir is not None:
        import yaml

        problem.check_resume(yaml.safe_load((Path(resume_dir) / "config.yaml").read_text()) or {}, str(resume_dir))
    if opts.output.show:
        stderr_console.print(f"data: [bold]{ds.name}[/] ({ds.source}), {len(ds.y_train):,} train / {len(ds.y_test):,} test; "
                             f"model: [bold]{cfg.model}[/] ({problem.model.n_params:,} parameters); algorithm: [bold]{algo}[/]")
    resolved = cfg.to_dict() | {"mode": "run", "run": opts.to_dict(), "data_source": ds.source,
                                "n_params": problem.model.n_params} | problem.data_fields()
    write_config(run_dir / "config.yaml", resolved)  # on --resume too: it records a changed --n-proc or stop rule
    bopts = BrokerOptions(opts.server, opts.network, n_workers=opts.n_workers, bind=access.bind(opts.network.port), curve=access.broker_curve(),
                          token=access.broker_token(),
                          emulator=opts.emulator(cfg.seed), emulation=opts.emulation)
    launcher = None
    interrupted = False
    restore_env: Callable[[], None] = lambda: None
    from zsgd.runtime import stop_signal

    try:
        with MetricsWriter(run_dir / "metrics.jsonl", tensorboard=run_dir / "tensorboard" if opts.output.tensorboard else None) as metrics:
            if topology is not None:
                from zsgd.runtime.server.relay import relay_service

                # the relay keeps no checkpoint (the nodes hold the state): its checkpoint_state() is None
                broker = Broker(cfg, problem, bopts, run_dir, metrics, service=relay_service(algo, topology, _resolved_params(opts, cfg)))
            else:
                from zsgd.runtime.server.broker import parameter_server
                from zsgd.runtime.server.sharded import sharded_parameter_server

                broker = Broker(cfg, problem, bopts, run_dir, metrics, resume=resume, run_id=resume[2].get("run") if resume else None,
                                service=sharded_parameter_server if servers > 1 else parameter_server)
            metrics.write("start", broker.elapsed, mode="run", algo=algo, n_workers=opts.n_workers, address=broker.address, pid=os.getpid(),
                          model=cfg.model, data=ds.name, n_params=problem.model.n_params, resumed=resume is not None)
            show, net = opts.output.show, opts.network
            if show:
                stderr_console.print(f"broker listening on [bold]{broker.address}[/]{' (CURVE)' if access.secure else ''}; run directory {run_dir}")
            if not access.secure or (opts.expect_workers and not opts.remote.keys_dir):
                # workers started by hand ('zsgd broker', or a worker of 'zsgd run' restarted by hand) need these to join
                access.write_client_files(run_dir, opts.expect_workers or 0, announce=show and bool(opts.expect_workers))
            placed = access.plan.server_placement() if access.plan is not None else {}
            workers_by = LOCAL if opts.launcher in (LOCAL, "ssh") else opts.launcher  # with --remote, the first ids are local
            ranks = plan_ranks(opts.n_proc + opts.slurm_workers, opts.remote_workers, servers, set(placed), opts.evaluator, workers_by)
            launcher = access.launchers(broker, run_dir, net.heartbeat, net.timeout, show, ranks)
            # Local and srun workers follow the run's --shared-memory (and a broker switched off declines offers anyway).
            restore_env = _children_env("ZSGD_SHARED_MEMORY", "1" if net.shared_memory else "0")
            started = time.monotonic()
            stop_signal.stop_on_signals(broker.ledger, show)  # SIGTERM, Ctrl-C: checkpoint, summary, clean exit
            if servers > 1 and access.secure:
                for i in range(opts.n_workers):  # the range servers' allow-lists are fixed when they start
                    access.keys.bundle(f"worker-{i}")
            launcher.start(ranks)
            with RunView(f"{algo} x{opts.n_workers}", broker.ledger.expected_updates(), enabled=show,
                         language_model=problem.is_language_model) as view:
                def tick(b: Broker) -> None:
                    view.update(b)
                    _check_children(b, launcher, opts, started)

                try:
                    broker.serve(on_tick=tick)
                except KeyboardInterrupt:
                    # A second Ctrl-C (the first only set the stop reason): the broker has checkpointed
                    # on its way out; write the summary of what was done, then exit as interrupted.
                    interrupted = True
                    broker.ledger.stop("interrupted")
                interrupted = interrupted or stop_signal.interrupted()
                view.update(broker)  # the last frame: where the run ended, not its last tick
            # The broker has said LEAVE and closed its socket: the children end on their own while the
            # results are written, and are reaped below before this function returns, whatever happens.
            broker.final_evaluation()
            summary = broker.ledger.close(broker.elapsed, run_header("run", algo, opts.n_workers, cfg.model, ds, problem.model.n_params),
                                          **broker.summary_extra())
        from zsgd.output.rundir import save_arrays

        save_arrays(run_dir / "weights.npz", problem.model.state_dict(broker.service.weights))
        write_json(run_dir / "summary.json", summary)
        if opts.output.plots:
            from zsgd.output.plots import plot_run

            plot_run(run_dir)
    finally:
        if launcher is not None:
            launcher.stop_all(grace=2 * opts.network.heartbeat + 1)
        stop_signal.stop_on_signals(None)
        restore_env()
    summary["run_dir"] = str(run_dir)
    if interrupted:
        raise KeyboardInterrupt
    if broker.failed:
        from zsgd.runtime.server.relay import RunStopped

        raise RunStopped(f"run stopped early: {summary['stop_reason']} (summary of {summary['updates']} rounds in {run_dir})")
    return summary


def _children_env(name: str, value: str) -> Callable[[], None]:
    """Set ``name`` for the processes this run starts from now on (forked, exec'd or srun'd, they inherit it);
    returns what puts it back, for a run made in a longer-lived process (tests, notebooks)."""
    before = os.environ.get(name)
    os.environ[name] = value

    def restore() -> None:
        if before is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = before

    return restore


def _resolved_params(opts: RunOptions, cfg: TrainConfig):
    """The rule's parameters with alpha0 (the problem's lr) and gamma filled in, as the nodes will use them."""
    from dataclasses import replace

    params = opts.decentralized.params()
    return replace(params, alpha0=params.alpha0 or cfg.lr, gamma=params.resolved_gamma(opts.server.compress))


def _check_children(broker: Broker, launcher, opts: RunOptions, started: float) -> None:
    """Abort early, with the reason, if a launched process ended on an error or every launched worker died before joining; stop (with a
    checkpoint) when a launcher has lost its ranks for good (an srun step that ended)."""
    failed = launcher.failed()  # a rank that ended on an error (a module its host lacks) fails the run, even if others train on
    if failed is not None and broker.ledger.stop_reason is None:
        broker.ledger.stop("a launched process failed")
        raise ZsgdError(failed)
    lost = launcher.lost()
    if lost is not None and broker.ledger.updates > 0 and broker.ledger.stop_reason is None:
        broker.ledger.stop(lost)
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
