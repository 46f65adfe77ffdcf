"""The single-process trainer: the baseline every distributed mode is compared with.

It runs the same model, data pipeline, optimizer and stop rules as the
distributed runtime, in one process with no sockets, so "does distribution
help?" is answered against an honest baseline with identical numerics.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from zsgd.core.config import TrainConfig, write_config
from zsgd.core.ledger import run_header
from zsgd.core.tally import WorkerTally
from zsgd.output.metrics import MetricsWriter
from zsgd.output.rundir import create_run_dir, save_arrays, write_json
from zsgd.algorithms.schedules import resolve_lr_schedule
from zsgd.core.problem import Problem
from zsgd.runtime import stop_signal


def train(cfg: TrainConfig, out: str | Path | None = None, show_progress: bool = True, problem: Problem | None = None) -> dict[str, Any]:
    """Train in this process; write the run directory; return the summary.

    Ctrl-C and SIGTERM end the loop through the ledger, as in ``zsgd run`` (``zsgd.runtime.stop_signal``): the
    summary (stop reason "interrupted" or "stopped by SIGTERM") and the weights are written either way; after a
    Ctrl-C, KeyboardInterrupt is raised once they are, so the command exits with 130.
    """
    try:
        return _train(cfg, out, show_progress, problem)
    finally:
        stop_signal.stop_on_signals(None)


def _train(cfg: TrainConfig, out: str | Path | None, show_progress: bool, problem: Problem | None) -> dict[str, Any]:
    from zsgd.algorithms import make_server_algorithm
    from zsgd.algorithms.worker import WorkerStep
    from zsgd.engine import ServerEngine
    from zsgd.nn.optim import make_optimizer
    from zsgd.output.live import TrainProgress

    cfg = resolve_lr_schedule(cfg.validate(), "train")
    problem = problem or Problem.from_config(cfg)
    ds, model = problem.dataset, problem.model
    run_dir = create_run_dir(out, cfg.name)
    resolved = cfg.to_dict() | {"mode": "train", "data_source": ds.source, "n_params": model.n_params} | problem.data_fields()
    write_config(run_dir / "config.yaml", resolved)

    optimizer = make_optimizer(cfg.optimizer, model.n_params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    # The trainer is worker 0 of 1: the very WorkerStep the distributed workers run,
    # applied by the very server algorithm the broker drives (a sync round of one
    # applies its gradient exactly), so `zsgd run --n-proc 1 --algo sync` reproduces it.
    server = make_server_algorithm("sync", model.init(seed=cfg.seed), optimizer, clip_norm=cfg.clip_norm)
    port = _OneWorker()
    step = WorkerStep(model, ds.x_train, ds.y_train, cfg.batch_size, cfg.seed, worker=0)
    n_train = len(ds.y_train)
    eval_time = 0.0

    with MetricsWriter(run_dir / "metrics.jsonl") as metrics, TrainProgress(problem.stop_rule(cfg).total_updates, cfg.name, show_progress,
                                                                                  language_model=problem.is_language_model) as bar:
        ledger = problem.ledger(cfg, emit=metrics.write)
        t0 = time.perf_counter()
        metrics.write("start", 0.0, mode="train", model=cfg.model, data=ds.name, n_params=model.n_params, n_train=n_train)

        def evaluate() -> None:
            nonlocal eval_time
            t_eval = time.perf_counter()
            test_loss, test_acc = problem.evaluate(server.w)
            spent = time.perf_counter() - t_eval
            eval_time += spent
            bar.exclude(spent)
            ledger.evaluated(time.perf_counter() - t0, test_loss, test_acc)

        engine = ServerEngine(server, optimizer, ledger, port, run="0" * 12, lr_schedule=cfg.lr_schedule, default_batch=cfg.batch_size)
        engine.add_worker(0, 0.0)
        stop_signal.stop_on_signals(ledger, show_progress, checkpoints=False)
        at_once = False
        try:
            _loop(engine, port, step, ledger, bar, evaluate, t0, n_train)
        except KeyboardInterrupt:  # a second Ctrl-C: stop at once (no final evaluation), still writing what was done
            ledger.stop("interrupted")
            at_once = True
        interrupted = at_once or stop_signal.interrupted()
        if ledger.final_eval_needed and not at_once:
            evaluate()
        wall = time.perf_counter() - t0
        summary = ledger.close(wall, run_header("train", None, 1, cfg.model, ds, model.n_params), busy_s=wall - eval_time)
    save_arrays(run_dir / "weights.npz", model.state_dict(server.w))
    write_json(run_dir / "summary.json", summary)
    from zsgd.output.plots import plot_run

    plot_run(run_dir)
    summary["run_dir"] = str(run_dir)
    if interrupted:
        raise KeyboardInterrupt
    return summary


class _OneWorker:
    """The trainer's port of the server engine: one worker in this process, whose next step takes the reply's weights."""

    def __init__(self) -> None:
        self.worker = WorkerTally()
        self.weights: np.ndarray | None = None
        self.rejected: str | None = None

    def tally(self, worker: int) -> WorkerTally:
        return self.worker

    def live_workers(self) -> list[int]:
        return [0]

    def send_weights(self, worker: int, version: int, weights: np.ndarray, coded: Any) -> None:
        self.weights = weights

    def send_abandon(self, worker: int, version: int) -> None:
        pass  # a sync round of one never abandons its step

    def reject(self, worker: int, reason: str, text: str) -> None:
        self.rejected = reason  # a non-finite gradient: the engine gives the weights again; the loop ends the run

    def booked(self, applied: Any) -> None:
        pass  # the loop evaluates on the ledger's cadence after each step


def _loop(engine: Any, port: _OneWorker, step: Any, ledger: Any, bar: Any, evaluate: Any, t0: float, n_train: int) -> None:
    """Steps until the ledger has a stop reason (a budget, divergence, or a signal)."""
    import math

    while ledger.stop_reason is None:
        update = step.compute(port.weights, engine.version)
        now = time.perf_counter() - t0
        if not math.isfinite(update.loss):
            ledger.diverge("train loss is not finite")
            break
        port.rejected = None
        engine.apply(update, now, 4 * engine.n)
        if port.rejected == "non-finite":  # the server step refused a NaN/Inf gradient: here, the model blew up
            ledger.diverge("gradient is not finite")
        if ledger.take_eval():
            evaluate()
        bar.update(ledger.updates, ledger.samples, ledger.samples / n_train, None if np.isnan(ledger.last_loss) else ledger.last_loss,
                   None if np.isnan(ledger.test_acc) else ledger.test_acc, None if np.isnan(ledger.test_loss) else ledger.test_loss)
        ledger.check(time.perf_counter() - t0)
