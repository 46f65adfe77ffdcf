"""``ksync:K`` and ``kasync:K`` over K range servers: one server decides, the others replay its decisions.

A K-group rule picks each step's gradients by arrival order. With the model
split over range servers (``--servers K``) every server sees its own arrival
order, so the servers could pick different workers for the same step, and two
servers could each wait for a gradient whose sender waits on the other. So
only the coordinator (range 0) runs the rule; ``StepLeader`` turns what its
rule did into a log of decisions, in order:

* ``["step", version, lr, ok, [[worker, seq, n_samples], ...]]`` -- the
  gradients of one step, in the order the coordinator summed them (a sum of
  floats depends on its order), the lr it used and the version after it
  (``ok`` false: the mean was not finite, nothing was applied);
* ``["drop", worker, seq]`` -- that gradient is not used (late, a duplicate); it is
  waited for all the same, so the reply that follows answers it (one reply per update);
* ``["reply", worker, version]`` -- send that worker this range's weights now;
* ``["state", tag, full]`` -- answer a gather here (so a checkpoint or an
  evaluation holds every range at the same version).

Each worker numbers its gradients (``seq``, the same number on every range of
one gradient), which is how a range server finds the one a decision names.
``StepFollower`` is a range server's rule: it keeps each arriving gradient,
and replays the log in order; an entry that names a gradient not yet here
waits for it. So every range applies the same workers' gradients, summed in
the same order with the same lr, and answers the same workers at the same
versions: a worker always holds every range at one version.

A gradient that never comes (its sender died between its ranges, or sent a
range this server rejected) is left out of that range's step after
``give_up_s``, and counted (``missing_gradients``); the step's version still
advances, so the ranges stay in step.

Both sides keep a digest of the steps (versions, workers, seqs, in order):
equal digests say every range applied the same sets in the same order.
"""

from __future__ import annotations

import hashlib
from collections import deque
from dataclasses import dataclass
from typing import Any

import numpy as np

from zsgd.algorithms.base import Applied, Dropped, Output, Reply, ServerAlgorithm, Update
from zsgd.nn.server_step import add_scaled, is_finite

OWED_MAX = 8  # replies kept for a worker that has not joined this range server yet


@dataclass(frozen=True)
class Gather:
    """A follower's output: answer the coordinator's gather ``tag`` now (the log has reached it)."""

    tag: int
    full: bool


class _Digest:
    def __init__(self) -> None:
        self._h = hashlib.sha256()
        self.steps = 0

    def step(self, version: int, members: list) -> None:
        self._h.update(repr((version, [(int(w), int(s)) for w, s, *_ in members])).encode())
        self.steps += 1

    def hex(self) -> str:
        return self._h.hexdigest()[:16]


def update_seq(update: Update) -> int | None:
    seq = update.meta.get("seq")
    return seq if isinstance(seq, int) and not isinstance(seq, bool) else None


class StepLeader:
    """The coordinator's side: what its K-group rule did, as log entries for the range servers."""

    def __init__(self) -> None:
        self.entries: list[list] = []
        self._pending: dict[int, tuple[int, int]] = {}  # worker -> (seq, n_samples) of its gradient in the pending step
        self.digest = _Digest()

    def update(self, update: Update, outputs: list[Output]) -> None:
        """The rule took or dropped ``update`` (before its outputs are logged: a step they hold may include it)."""
        seq = update_seq(update)
        if any(isinstance(o, Dropped) and o.worker == update.worker for o in outputs):
            if seq is not None:
                self.entries.append(["drop", update.worker, seq])
        else:
            self._pending[update.worker] = (seq if seq is not None else -1, int(update.n_samples))

    def outputs(self, outputs: list[Output]) -> None:
        for o in outputs:
            if isinstance(o, Reply):
                self.entries.append(["reply", o.worker, o.version])
            elif isinstance(o, Applied) and o.worker == -1:
                self._step(o.version, o.lr, True, o.workers)
            elif isinstance(o, Dropped) and o.worker == -1:  # the mean was not finite: nothing applied (the run diverged)
                self._step(None, 0.0, False, tuple(self._pending))

    def _step(self, version: int | None, lr: float, ok: bool, workers: tuple[int, ...]) -> None:
        members = [[w, *self._pending.pop(w, (-1, 0))] for w in workers]
        self._pending.clear()  # a step takes every pending gradient
        self.entries.append(["step", version, float(lr), ok, members])
        if ok:
            self.digest.step(version, members)

    def gather(self, tag: int, full: bool) -> None:
        self.entries.append(["state", int(tag), bool(full)])

    def take(self) -> list[list]:
        out, self.entries = self.entries, []
        return out


class StepFollower(ServerAlgorithm):
    """A range server's rule under ``ksync``/``kasync``: keep gradients, apply the coordinator's decisions."""

    name = "follower"

    def __init__(self, *args, give_up_s: float = 10.0, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.give_up_s = give_up_s
        self._grads: dict[int, dict[int, tuple[np.ndarray | None, int]]] = {}  # worker -> seq -> (gradient or None, base version)
        self._log: deque[list] = deque()
        self._waiting_since: float | None = None
        self._owed: dict[int, list[tuple[int, np.ndarray]]] = {}
        self.digest = _Digest()
        self.missing = self.version_mismatch = 0

    # -- gradients ---------------------------------------------------------------------
    def on_update(self, update: Update, now: float) -> list[Output]:
        w, seq = update.worker, update_seq(update)
        if seq is None:
            return [Dropped(w, "no-seq")]
        grad = np.asarray(update.grad, dtype=np.float32)
        out: list[Output] = []
        if not is_finite(grad):
            out.append(Dropped(w, "non-finite"))  # rejected and counted; the step that names it goes without it here
            grad = None
        else:
            grad = np.array(grad, copy=True)  # kept until the step: a receive buffer (shared memory) may be reused
        mine = self._grads.setdefault(w, {})
        mine[seq] = (grad, update.base_version)
        while len(mine) > OWED_MAX:
            del mine[min(mine)]
        return out + self._replay(now)

    def add_worker(self, worker: int, now: float) -> list[Output]:
        self.live.add(worker)
        return [Reply(worker, v, snap) for v, snap in self._owed.pop(worker, [])]

    def remove_worker(self, worker: int, now: float) -> list[Output]:
        self.live.discard(worker)  # its gradients stay: a step may still name them
        return self._replay(now)

    # -- the log -----------------------------------------------------------------------
    def follow(self, entries: list, now: float) -> list[Output]:
        self._log.extend(entries)
        return self._replay(now)

    def tick(self, now: float) -> list[Output]:
        return self._replay(now) if self._log else []

    def _replay(self, now: float) -> list[Output]:
        out: list[Output] = []
        while self._log:
            e = self._log[0]
            kind = e[0] if isinstance(e, list) and e else None
            if kind == "step":
                got = self._step(e, now)
                if got is None:
                    break  # a gradient it names is not here yet
                out += got
            elif kind == "drop":  # once it is here: the reply that follows answers it (one reply per update)
                here = self._arrived(e[1], e[2], now)
                if here is None:
                    break
                self._grads.get(e[1], {}).pop(e[2], None)
            elif kind == "reply":
                out += self._reply(int(e[1]), int(e[2]))
            elif kind == "state":
                out.append(Gather(int(e[1]), bool(e[2])))
            self._log.popleft()
            self._waiting_since = None
        return out

    def _step(self, e: list, now: float) -> list[Output] | None:
        _kind, version, lr, ok, members = e
        found = []
        for w, seq, n in members:
            here = self._arrived(w, seq, now)
            if here is None:
                return None
            if here:
                found.append((w, seq, n, self._grads[w][seq]))
        for w, seq, _n, _g in found:
            self._grads[w].pop(seq, None)
        if not ok:
            return [Dropped(-1, "non-finite")]
        usable = [(w, n, g, base) for w, _seq, n, (g, base) in found if g is not None]
        workers = tuple(w for w, _s, _n in members)
        if usable:
            if len(usable) == 1:
                grad, samples = usable[0][2], usable[0][1]
            else:
                grad = usable[0][2] * np.float32(usable[0][1])
                for _w, n, g, _b in usable[1:]:
                    add_scaled(grad, g, np.float32(n))
                samples = sum(n for _w, n, _g, _b in usable)
                grad = grad / np.float32(samples)
            if self.apply(grad, 0, lr=lr) is None:
                self.version += 1  # the coordinator applied its range: stay on its version
        else:
            samples = 0
            self.version += 1
        if self.version != version:
            self.version_mismatch += 1
            self.version = int(version)
        self.digest.step(version, members)
        return [Applied(-1, self.version, 0, samples, float(lr), contributors=len(workers), workers=workers)]

    def _arrived(self, worker: int, seq: int, now: float) -> bool | None:
        """Whether that gradient is here; None: not yet, wait for it; False: given up on it (counted)."""
        if seq in self._grads.get(worker, {}):
            return True
        if self._waiting_since is None:
            self._waiting_since = now
        if now - self._waiting_since < self.give_up_s:
            return None
        self.missing += 1
        return False

    def _reply(self, worker: int, version: int) -> list[Output]:
        if version != self.version:
            self.version_mismatch += 1
        if worker in self.live:
            return [self.reply(worker)]
        owed = self._owed.setdefault(worker, [])  # not joined here yet: it gets these weights when it does
        owed.append((self.version, np.array(self.w, copy=True)))
        del owed[:-OWED_MAX]
        return []

    def report(self) -> dict[str, Any]:
        return {"followed_steps": self.digest.steps, "step_digest": self.digest.hex(), "missing_gradients": self.missing,
                "version_mismatches": self.version_mismatch}
