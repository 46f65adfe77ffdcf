"""The worker's step, sans-IO: weights in, update out.

The runtime's worker process and the simulator's virtual workers both call
``WorkerStep.compute``; only who delivers the weights differs. A worker owns
its shard and its batch stream (seeded by run seed and worker index), so a
worker's sequence of mini-batches is the same in a real run and a simulation.

A language model's worker (``model.is_language_model``) reads its shard, a
contiguous span of tokens, as ``batch_size`` parallel rows ``model.bptt``
tokens at a time (``zsgd.data.text.TokenStream``) and carries the model's
hidden state from one batch to the next, resetting it where the stream
starts over; its ``n_samples`` are tokens (batch x bptt).
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from zsgd.algorithms.base import Update


class WorkerStep:
    def __init__(self, model, x: np.ndarray, y: np.ndarray, batch_size: int, seed: int, worker: int) -> None:
        from zsgd.data import BatchStream

        if len(y) == 0:
            raise ValueError(f"worker {worker} has an empty data shard")
        self.model = model
        self.x, self.y = x, y
        self.worker = worker
        self.seed = seed
        self.steps = 0
        if getattr(model, "is_language_model", False):
            from zsgd.data import TokenStream

            self.tokens = TokenStream(x, batch_size, model.bptt)
            self.state = model.init_state(batch_size)
        else:
            self.tokens = None
            self.stream = BatchStream(np.arange(len(y), dtype=np.int64), batch_size, seed=seed * 1_000_003 + worker)

    def compute(self, weights: np.ndarray, version: int, on_ready: Callable | None = None) -> Update:
        """One gradient at ``weights``. ``on_ready(offset, grad, loss, n)``, when the model streams its
        gradient (``streams_gradients``), hears of each finished tail ``grad[offset:]`` during backward."""
        from zsgd.data import to_float
        from zsgd.core.problem import step_seed

        if self.tokens is not None:
            return self._compute_lm(weights, version)
        idx = next(self.stream)
        stream = {"on_ready": on_ready} if on_ready is not None and getattr(self.model, "streams_gradients", False) else {}
        with np.errstate(over="ignore", invalid="ignore"):  # divergence shows as a non-finite loss, reported by the caller
            loss, grad = self.model.loss_and_grad(
                weights, to_float(self.x[idx]), self.y[idx], training=True, seed=step_seed(self.seed, self.worker, self.steps), **stream
            )
        self.steps += 1
        return Update(self.worker, version, grad, len(idx), float(loss))

    def warm_up(self, weights: np.ndarray) -> None:
        """One throw-away gradient on the shard's first examples, so the kernels are loaded before
        the first timed step; the batch stream, the step count and a carried state stay untouched."""
        from zsgd.data import to_float

        with np.errstate(over="ignore", invalid="ignore"):
            if self.tokens is not None:
                rows = self.tokens.rows[:1]
                t = min(self.model.bptt, rows.shape[1] - 1)
                x, y = (np.ascontiguousarray(rows[:, s:s + t], dtype=np.int64) for s in (0, 1))
                self.model.loss_and_grad(weights, x, y, state=self.model.init_state(1))
            else:
                n = min(len(self.y), 2)
                self.model.loss_and_grad(weights, to_float(self.x[:n]), self.y[:n], training=True, seed=0)

    def _compute_lm(self, weights: np.ndarray, version: int) -> Update:
        xb, yb, reset = next(self.tokens)
        if reset:  # the stream starts over: the carried state belongs to the span's end, not to this text
            self.state.reset()
        with np.errstate(over="ignore", invalid="ignore"):
            loss, grad = self.model.loss_and_grad(weights, xb, yb, state=self.state)
        self.steps += 1
        return Update(self.worker, version, grad, xb.size, float(loss))
