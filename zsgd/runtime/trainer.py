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
from zsgd.output.metrics import MetricsWriter
from zsgd.output.rundir import create_run_dir, save_arrays, write_json
from zsgd.core.schedule import resolve_lr_schedule
from zsgd.core.problem import Problem


def train(cfg: TrainConfig, out: str | Path | None = None, show_progress: bool = True, problem: Problem | None = None) -> dict[str, Any]:
    """Train in this process; write the run directory; return the summary."""
    from zsgd.algorithms.worker import WorkerStep
    from zsgd.output.live import TrainProgress
    from zsgd.nn.optim import clip_grad_norm, make_optimizer
    from zsgd.core.schedule import lr_factor

    cfg = resolve_lr_schedule(cfg.validate(), "train")
    problem = problem or Problem.from_config(cfg)
    ds, model = problem.dataset, problem.model
    run_dir = create_run_dir(out, cfg.name)
    resolved = cfg.to_dict() | {"mode": "train", "data_source": ds.source, "n_params": model.n_params}
    write_config(run_dir / "config.yaml", resolved)

    rule = problem.stop_rule(cfg)
    optimizer = make_optimizer(cfg.optimizer, model.n_params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    w = model.init(seed=cfg.seed)
    n_train = len(ds.y_train)
    # The trainer is worker 0 of 1 running the very WorkerStep the distributed
    # workers run, so `zsgd run --n-proc 1 --algo sync` reproduces it exactly.
    step = WorkerStep(model, ds.x_train, ds.y_train, cfg.batch_size, cfg.seed, worker=0)
    updates = samples = 0
    loss_sum, loss_n = 0.0, 0
    last_loss: float | None = None
    test_loss = test_acc = float("nan")
    next_epoch_eval = n_train
    reason = None
    evaluated = False
    eval_time = 0.0

    with MetricsWriter(run_dir / "metrics.jsonl") as metrics, TrainProgress(rule.total_updates, cfg.name, show_progress) as bar:
        t0 = time.perf_counter()
        metrics.write("start", 0.0, mode="train", model=cfg.model, data=ds.name, n_params=model.n_params, n_train=n_train)

        def run_eval() -> None:
            nonlocal test_loss, test_acc, eval_time
            t_eval = time.perf_counter()
            test_loss, test_acc = problem.evaluate(w)
            eval_time += time.perf_counter() - t_eval
            bar.exclude(time.perf_counter() - t_eval)
            metrics.write("eval", time.perf_counter() - t0, updates=updates, samples=samples, epoch=samples / n_train, test_loss=test_loss, test_acc=test_acc)

        while reason is None:
            update = step.compute(w, updates)
            loss, grad = update.loss, update.grad
            if cfg.clip_norm is not None:
                clip_grad_norm(grad, cfg.clip_norm)
            # The factor from the counters before this step, as the broker takes it.
            optimizer.step(w, grad, cfg.lr * lr_factor(cfg.lr_schedule, rule.progress(updates, samples, time.perf_counter() - t0)))
            updates += 1
            samples += update.n_samples
            if not np.isfinite(loss):
                reason = "diverged (loss is not finite): lower --lr"
                break
            loss_sum, loss_n = loss_sum + loss, loss_n + 1
            if updates % cfg.log_every == 0:
                last_loss = loss_sum / loss_n
                metrics.write("train", time.perf_counter() - t0, updates=updates, samples=samples, epoch=samples / n_train, loss=last_loss)
                loss_sum, loss_n = 0.0, 0
            evaluated = False
            if (cfg.eval_every and updates % cfg.eval_every == 0) or (not cfg.eval_every and samples >= next_epoch_eval):
                run_eval()
                evaluated = True
                while next_epoch_eval <= samples:
                    next_epoch_eval += n_train
            bar.update(updates, samples, samples / n_train, last_loss, None if np.isnan(test_acc) else test_acc)
            reason = rule.reason(updates, samples, time.perf_counter() - t0, test_acc if evaluated else None)
        if not evaluated or np.isnan(test_acc):
            run_eval()
        wall = time.perf_counter() - t0
        summary = {
            "mode": "train",
            "model": cfg.model,
            "data": ds.name,
            "data_source": ds.source,
            "n_params": model.n_params,
            "test_accuracy": test_acc,
            "test_loss": test_loss,
            "train_loss": last_loss,
            "updates": updates,
            "samples": samples,
            "epochs": samples / n_train,
            "wall_s": wall,
            "samples_per_s": samples / (wall - eval_time) if wall > eval_time else 0.0,
            "stop_reason": reason,
        }
        metrics.write("end", wall, updates=updates, samples=samples, test_loss=test_loss, test_acc=test_acc, reason=reason)
    save_arrays(run_dir / "weights.npz", model.state_dict(w))
    write_json(run_dir / "summary.json", summary)
    from zsgd.output.plots import plot_run

    plot_run(run_dir)
    summary["run_dir"] = str(run_dir)
    return summary
