"""The run ledger: one account of a run's progress, for every way of running it.

The trainer, the broker, the decentralized relay, the simulator and the
decentralized simulator all feed the same object with what happened (an
update was applied, a worker's loss arrived, an evaluation came back), each
with a time: wall clock in real runs, virtual clock in simulations. The
ledger answers with the metrics events (through the ``emit`` callback, so it
does no I/O itself), the evaluation schedule, the stop decision and the
summary's core keys. A real run and its simulation therefore count,
evaluate, detect divergence and stop by the very same rules; before this
object the five drivers each kept their own loss window and evaluation
marks, and had already drifted apart.

Divergence (``--diverge-factor F``, default 100, 0 turns the loss test off):
the run stops with ``stop_reason`` "diverged at update N (...)" when

* a train loss, a gradient or the model is not finite (always on), or
* the mean train loss of one logging window exceeds F squared times the
  run's first loss (an explosion: 10^4 x for the default), or
* the mean train loss of ``DIVERGE_PATIENCE`` consecutive logging windows
  (``--log-every`` updates each) stays above F times the run's first loss
  (the loss of the initial model, or of the resumed one -- the lowest of the
  workers' first losses -- at least ``LOSS_FLOOR``): a loss that only
  spikes once is noise, one that stays two orders of magnitude above where
  it started has weights that are blowing up. (Ten times would stop runs
  that are merely unstable: 8 stale async workers on logistic regression
  wander at 10x their start and still learn.)

The losses come from the workers. Where a worker is a peer of its own (the
runtime's broker), one worker's reports only *suggest* a divergence: the
ledger names the workers whose own losses crossed the threshold, and a
driver that sets ``confirm_divergence`` decides -- the broker ends the run
when two workers (or its only one) agree, or when its own evaluation of
its model does; otherwise the suspicion is an ``unconfirmed_divergence``
event and the run goes on. So one admitted process reporting a NaN or a
huge loss cannot stop a run by itself. The simulator and ``zsgd train``
compute their workers' losses themselves and set no check.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from zsgd.core.stopping import StopRule

DIVERGE_PATIENCE = 3  # consecutive logging windows above the factor
LOSS_FLOOR = 0.1  # the start loss the factors multiply is at least this (a resumed, well-fit model starts near 0)
EVALS_PER_RUN = 10  # an automatic cadence gives about this many test points per run (and at least one per epoch)

Emit = Callable[..., Any]  # emit(event, t, **fields), e.g. MetricsWriter.write


def perplexity(loss: float) -> float:
    """``exp`` of a mean cross-entropy in nats (inf for a diverged or huge loss, never an OverflowError)."""
    return math.exp(loss) if math.isfinite(loss) and loss < 700.0 else math.inf


def _finite_or_none(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


@dataclass
class EvalRecord:
    """One evaluation of the central (or averaged) model."""

    t: float
    updates: int
    samples: int
    test_loss: float
    test_acc: float
    extra: dict[str, Any] = field(default_factory=dict)


def _above(worst: dict[int, float], limit: float) -> frozenset[int]:
    """The workers whose highest loss of a window crossed ``limit`` (a non-finite loss, kept as inf, always does)."""
    return frozenset(w for w, v in worst.items() if v > limit or math.isinf(v))


class RunLedger:
    """Counts updates and samples, keeps the loss window and the evaluation
    marks, decides when to stop and writes the summary's core keys.

    ``eval_every`` > 0 evaluates every that many updates; 0 chooses a cadence
    of about ``EVALS_PER_RUN`` points over the run's length (its first
    step, epoch or time budget) and at least one per epoch, so a live view
    shows test accuracy during a default one-epoch run.
    """

    def __init__(self, rule: StopRule, *, n_train: int, log_every: int = 20, eval_every: int = 0,
                 diverge_factor: float = 100.0, emit: Emit | None = None, updates: int = 0, samples: int = 0,
                 language_model: bool = False) -> None:
        self.rule = rule
        #: samples are tokens: evaluations add ``test_perplexity``, the summary ``tokens_per_s`` too
        self.language_model = language_model
        self.n_train = max(1, int(n_train))
        self.log_every = max(1, int(log_every))
        self.eval_every = int(eval_every)
        self.diverge_factor = float(diverge_factor)
        self.emit = emit or (lambda *a, **k: None)
        self.updates, self.samples = int(updates), int(samples)
        self.staleness: list[int] = []
        self._window: list[float] = []
        self.last_loss = math.nan
        self.first_loss: float | None = None
        self._high_windows = 0
        #: the driver's own check of a divergence that workers' losses suggest: called with the loss above which the
        #: model has diverged (inf: only a non-finite loss) and the workers whose losses crossed it; True ends the
        #: run. None: the losses are trusted (they were computed here)
        self.confirm_divergence: Callable[[float, frozenset[int]], bool] | None = None
        self._worst: dict[int, float] = {}  # each reporting worker's highest loss in this window (inf: not finite)
        self._reported: set[int] = set()  # workers whose first loss has been seen
        self._high_workers: set[int] = set()  # workers above the patience threshold in the high windows so far
        self.unconfirmed_divergences = 0
        self.diverge_hint = "lower --lr"  # what a diverged run's reason tells the user to change (a rule may add its own knob)
        self._t = 0.0  # the run's time at the last update or tick (for events raised between them)
        self.test_loss = self.test_acc = math.nan
        self.evals: list[EvalRecord] = []
        self.stop_reason: str | None = None
        self._samples_per_update: float | None = None  # the last update's, for expected_updates
        self.eval_wanted = False
        self._next_epoch_mark = (self.samples // self.n_train + 1) * self.n_train
        self._next_progress_mark = 0
        self._next_update_mark = self.updates + self.eval_every if self.eval_every else None
        self._advance_progress_mark(0.0)

    # -- what the drivers tell it ------------------------------------------------
    @property
    def diverged(self) -> bool:
        return self.stop_reason is not None and self.stop_reason.startswith("diverged")

    def stop(self, reason: str) -> None:
        """End the run for ``reason``; the first reason given wins."""
        if self.stop_reason is None:
            self.stop_reason = reason

    def diverge(self, what: str, update: int | None = None) -> None:
        """End the run as diverged; this replaces a budget reason (a model found non-finite at the final
        evaluation of a run that "reached 200 updates" still diverged), never an earlier divergence."""
        if not self.diverged:
            self.stop_reason = f"diverged at update {self.updates + 1 if update is None else update} ({what}): {self.diverge_hint}"

    def suspect(self, what: str, limit: float = math.inf, update: int | None = None, *,
                workers: "frozenset[int] | None" = None) -> bool:
        """Workers' losses say the run diverged (``what``): end it, unless the driver's check disagrees (see the
        module docstring). ``limit``: the loss above which a worker's own report agrees; ``workers``: those that
        agree (default: this window's reports above ``limit``). True: the run stops."""
        if workers is None:
            workers = _above(self._worst, limit)
        if self.confirm_divergence is None or self.confirm_divergence(limit, workers):
            self.diverge(what, update)
            return True
        self.unconfirmed_divergences += 1
        self.emit("unconfirmed_divergence", self._t, updates=self.updates, what=what, workers=sorted(workers))
        return False

    def loss(self, value: float | None, worker: int | None = None, *, by: "dict[int, float] | None" = None) -> bool:
        """A worker's train loss for one accepted gradient (it enters the logging window). ``by``: each
        reporting worker's own loss, where ``value`` aggregates several (a decentralized round's mean).

        False when the value was not taken: not finite, and the driver's check found the model sound."""
        value = math.nan if value is None else float(value)
        reports = by if by is not None else ({worker: value} if worker is not None and worker >= 0 else {})
        for w, v in reports.items():
            v = float(v) if v is not None and math.isfinite(v) else math.inf
            self._worst[w] = max(self._worst.get(w, -math.inf), v)
        if not math.isfinite(value):
            self.suspect(f"train loss is not finite{'' if worker is None or worker < 0 else f' on worker {worker}'}")
            return False
        first = worker is None or worker < 0 or worker not in self._reported
        if first and worker is not None and worker >= 0:
            self._reported.add(worker)
        if self.first_loss is None or (first and value < self.first_loss):
            self.first_loss = value  # the lowest first loss of any worker: one reporter cannot raise the reference
        self._window.append(value)
        return True

    def progress(self, t: float) -> float:
        """How far the run is towards its budget, in [0, 1]: what --lr-schedule follows."""
        return self.rule.progress(self.updates, self.samples, t)

    def expected_updates(self) -> int | None:
        """The update count the run's count-based stop rule will stop at (None: not known yet), for live views."""
        return self.rule.expected_updates(self.updates, self.samples, self._samples_per_update)

    def applied(self, t: float, *, version: int, n_samples: int, worker: int = -1, staleness: int = 0,
                lr: float | None = None, train_extra: Callable[[], dict[str, Any]] | None = None, **fields: Any) -> None:
        """An update (or a round) changed the model: count it, log, schedule evaluation, check the stop rule.

        ``fields`` go into the ``update`` event; ``train_extra()``, when given, adds fields to a ``train`` event.
        """
        self._t = t
        if int(version) > self.updates:
            self._samples_per_update = int(n_samples) / (int(version) - self.updates)
        self.updates = int(version)
        self.samples += int(n_samples)
        self.staleness.append(int(staleness))
        self.emit("update", t, updates=self.updates, samples=self.samples, worker=worker, staleness=staleness, lr=lr, **fields)
        if self.updates % self.log_every == 0 and self._window:
            self._log_window(t, **(train_extra() if train_extra is not None else {}))
        self._check_eval_marks(t)
        self.check(t)

    def _log_window(self, t: float, **fields: Any) -> None:
        self.last_loss = float(np.mean(self._window))
        self._window.clear()
        worst, self._worst = self._worst, {}
        self.emit("train", t, updates=self.updates, samples=self.samples, epoch=self.samples / self.n_train, loss=self.last_loss,
                  **fields)
        start = max(self.first_loss, LOSS_FLOOR) if self.first_loss is not None else None
        if self.diverge_factor > 0 and start is not None and self.last_loss > self.diverge_factor ** 2 * start:
            limit = self.diverge_factor ** 2 * start
            self.suspect(f"train loss {self.last_loss:.4g} exploded past {self.diverge_factor ** 2:g} x its start {self.first_loss:.4g}",
                         limit, self.updates, workers=_above(worst, limit))
        elif self.diverge_factor > 0 and start is not None and self.last_loss > self.diverge_factor * start:
            limit = self.diverge_factor * start
            self._high_windows += 1
            self._high_workers |= _above(worst, limit)
            if self._high_windows >= DIVERGE_PATIENCE and not self.suspect(
                    f"train loss {self.last_loss:.4g} stayed above {self.diverge_factor:g} x its start "
                    f"{self.first_loss:.4g} for {DIVERGE_PATIENCE} log windows", limit, self.updates,
                    workers=frozenset(self._high_workers)):
                self._high_windows = 0  # the model was sound: count the patience again
                self._high_workers.clear()
        else:
            self._high_windows = 0
            self._high_workers.clear()

    def check(self, t: float) -> str | None:
        """Apply the budget stop rules at time ``t`` (call on ticks too: time runs out between updates)."""
        self._t = t
        if self.stop_reason is None:
            reason = self.rule.reason(self.updates, self.samples, t)
            if reason:
                self.stop(reason)
        if self.stop_reason is None and self.rule.time_limit is not None and not self.eval_every:
            self._check_eval_marks(t)
        return self.stop_reason

    def evaluated(self, t: float, test_loss: float, test_acc: float, *, updates: int | None = None, samples: int | None = None,
                  **extra: Any) -> EvalRecord:
        """An evaluation came back (it may describe an earlier model: ``updates`` says which)."""
        if self.language_model:
            extra = {"test_perplexity": perplexity(float(test_loss))} | extra
        rec = EvalRecord(float(t), self.updates if updates is None else int(updates), self.samples if samples is None else int(samples),
                         float(test_loss), float(test_acc), extra)
        self.test_loss, self.test_acc = rec.test_loss, rec.test_acc
        self.evals.append(rec)
        self.emit("eval", rec.t, updates=rec.updates, samples=rec.samples, epoch=rec.samples / self.n_train,
                  test_loss=rec.test_loss, test_acc=rec.test_acc, **extra)
        if not math.isfinite(rec.test_loss):
            self.diverge("the model is not finite: test loss is NaN", rec.updates)
        elif self.stop_reason is None:
            reason = self.rule.reason(self.updates, self.samples, t, rec.test_acc, rec.test_loss)
            if reason:
                self.stop(reason)
        return rec

    # -- the evaluation schedule -------------------------------------------------
    def _advance_progress_mark(self, progress: float) -> None:
        while self._next_progress_mark <= progress * EVALS_PER_RUN + 1e-9:
            self._next_progress_mark += 1

    def _check_eval_marks(self, t: float) -> None:
        due = False
        if self._next_update_mark is not None:
            if self.updates >= self._next_update_mark:
                due = True
                while self._next_update_mark <= self.updates:
                    self._next_update_mark += self.eval_every
        else:
            if self.samples >= self._next_epoch_mark:
                due = True
                while self._next_epoch_mark <= self.samples:
                    self._next_epoch_mark += self.n_train
            if self.rule.has_length:
                p = self.rule.progress(self.updates, self.samples, t)
                if p * EVALS_PER_RUN + 1e-9 >= self._next_progress_mark and p < 1.0:
                    due = True
                self._advance_progress_mark(p)
        if due:
            self.eval_wanted = True

    def set_eval_every(self, updates: int) -> None:
        """Evaluate every ``updates`` from now on (a driver whose models exist only at fixed rounds)."""
        self.eval_every = int(updates)
        self._next_update_mark = self.updates + self.eval_every if self.eval_every else None

    def take_eval(self) -> bool:
        """True once per due evaluation: the driver evaluates (or sends the weights to its evaluator) now."""
        if self.eval_wanted:
            self.eval_wanted = False
            return True
        return False

    def eval_interval_updates(self, samples_per_update: int) -> int:
        """The cadence in updates (for drivers that must fix it up front, e.g. decentralized model uploads)."""
        if self.eval_every:
            return self.eval_every
        per_epoch = max(1, math.ceil(self.n_train / max(1, samples_per_update)))
        total = self.rule.total_updates_at(samples_per_update)
        if total is None:
            return per_epoch
        return max(1, min(per_epoch, math.ceil(total / EVALS_PER_RUN)))

    # -- the summary -------------------------------------------------------------
    @property
    def final_eval_needed(self) -> bool:
        return not self.evals or self.evals[-1].updates != self.updates or not math.isfinite(self.test_acc)

    def close(self, t: float, header: dict[str, Any], *, busy_s: float | None = None, end_fields: dict[str, Any] | None = None,
              **extra: Any) -> dict[str, Any]:
        """The end of a run, the same for every driver: the ``end`` event, and the summary -- ``header``
        (``run_header``: what ran), the keys every mode has (``summary``), then the driver's ``extra``."""
        self.emit("end", t, updates=self.updates, samples=self.samples, test_loss=self.test_loss, test_acc=self.test_acc,
                  reason=self.stop_reason, **(end_fields or {}))
        return header | self.summary(t, busy_s) | extra

    def summary(self, t: float, busy_s: float | None = None) -> dict[str, Any]:
        """The keys every mode's ``summary.json`` has, with the same meaning everywhere."""
        stale = np.asarray(self.staleness if self.staleness else [0])
        active = t if busy_s is None else busy_s
        lm = {"test_perplexity": _finite_or_none(perplexity(self.test_loss)),
              "tokens_per_s": self.samples / active if active and active > 0 else None} if self.language_model else {}
        return lm | {
            "test_accuracy": _finite_or_none(self.test_acc), "test_loss": _finite_or_none(self.test_loss),
            "train_loss": _finite_or_none(self.last_loss), "updates": self.updates, "samples": self.samples,
            "epochs": self.samples / self.n_train, "wall_s": t,
            "samples_per_s": self.samples / active if active and active > 0 else None,
            "updates_per_s": self.updates / active if active and active > 0 else None,
            "staleness_mean": float(stale.mean()), "staleness_p50": float(np.percentile(stale, 50)),
            "staleness_p99": float(np.percentile(stale, 99)), "staleness_max": int(stale.max()),
            "stop_reason": self.stop_reason, "diverged": self.diverged,
        }


def run_header(mode: str, algo: str | None, n_workers: int, model: str, dataset: Any, n_params: int) -> dict[str, Any]:
    """What ran, at the head of every ``summary.json`` (``dataset``: the problem's, with its name and source)."""
    head: dict[str, Any] = {"mode": mode} | ({"algo": algo} if algo is not None else {})
    return head | {"n_workers": n_workers, "model": model, "data": dataset.name, "data_source": dataset.source, "n_params": n_params}


CORE_SUMMARY_KEYS = ("test_accuracy", "test_loss", "train_loss", "updates", "samples", "epochs", "wall_s", "samples_per_s",
                     "updates_per_s", "staleness_mean", "staleness_p50", "staleness_p99", "staleness_max", "stop_reason", "diverged")
