"""Arms side by side: a scheduler, a progress view, and three ways to run an arm.

A grid of simulated arms is embarrassingly parallel (every arm is a pure
function of the shared workload and its own options), yet arms used to run
one after another on one core. ``run_arms`` keeps up to ``capacity`` arms
running and hands out the next one when a slot frees; what "running an arm"
means is the runner's business:

- ``InlineRunner``: in this process (``--jobs 1``; also what a single arm
  gets, so there is no fork for nothing);
- ``ForkRunner``: ``jobs`` processes forked *before* the progress view
  starts its refresh thread (a fork never copies a held lock), each taking
  arm indices from a queue. Forked children share the loaded data set, the
  shards and the compiled kernels copy-on-write, so an arm starts at once;
  every child runs one BLAS thread (``zsgd.runtime.threads``), so ``--jobs N`` on N
  cores does not oversubscribe them;
- ``CommandRunner``: one subprocess per arm from a command line the caller
  builds (``srun --exact -n 1 -c 1 zsgd sim-arm ...`` under Slurm), for arms
  spread over the nodes of an allocation.

Results do not depend on the runner: an arm draws all its randomness from
its own seeded generators, and compute=measured is calibrated once, in the
parent, before any arm starts (``calibrate_once``), so ``--jobs 4`` writes
the metrics ``--jobs 1`` writes.
"""

from __future__ import annotations

import multiprocessing
import os
import queue
import signal
import subprocess
import time
import traceback
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

from zsgd.errors import ZsgdError

ProgressFn = Callable[[int, int, float, float], None]  # updates, samples, virtual t, test accuracy
ArmFn = Callable[[int, ProgressFn], Any]  # arm index, progress callback -> payload (picklable for ForkRunner)
STOP_GRACE_S = 10.0  # for a stopped arm's final evaluation and summary (the cnn evaluates in ~3 s) before SIGKILL
PROGRESS_EVERY_S = 0.25  # a child reports progress at most this often: the queue is not a firehose


def longest_first(costs: list[float]) -> list[int]:
    """Arm indices in the order to start them on several slots: the costliest first (ties in index order), so
    the arms that end last are short ones and no slot idles while one long arm finishes alone. An arm's
    results do not depend on when it runs; only the wall time does."""
    return sorted(range(len(costs)), key=lambda i: -costs[i])


def default_jobs() -> int:
    """The cores this process may run on (its affinity mask, which Slurm and taskset narrow), not the machine's count."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


@dataclass
class ArmEvent:
    kind: str  # "progress" | "done" | "failed"
    index: int
    payload: Any = None


class ArmFailed(ZsgdError):
    """An arm ended with an error: the one-line message of a user error, or a child's traceback for a bug."""


class InlineRunner:
    """Runs each arm to its end inside ``start`` (the caller's process)."""

    capacity = 1

    def __init__(self, fn: ArmFn, on_progress: Callable[[int, tuple], None]) -> None:
        self.fn, self.on_progress = fn, on_progress
        self._events: list[ArmEvent] = []

    def start(self, index: int) -> None:
        payload = self.fn(index, lambda *p: self.on_progress(index, p))
        self._events.append(ArmEvent("done", index, payload))

    def poll(self, timeout: float) -> list[ArmEvent]:
        events, self._events = self._events, []
        return events

    def close(self, abort: bool = False) -> None:
        pass


def _child_loop(fn: ArmFn, tasks: Any, events: Any) -> None:
    """A forked worker: run arms from ``tasks`` until ``None`` (or the parent's SIGTERM ends its arm); report through ``events``."""
    from zsgd.simulation import interrupt

    busy = [False]
    interrupt.in_forked_arm(lambda: busy[0])  # Ctrl-C is the parent's to handle; its SIGTERM ends the arm with a summary
    while not interrupt.requested():
        index = tasks.get()
        if index is None:
            return
        busy[0] = True
        events.put(("started", index, os.getpid()))
        last = [0.0]

        def progress(*p: Any, _i: int = index) -> None:
            now = time.monotonic()
            if now - last[0] >= PROGRESS_EVERY_S:
                last[0] = now
                events.put(("progress", _i, p))

        try:
            events.put(("done", index, fn(index, progress)))
        except ZsgdError as exc:
            events.put(("failed", index, str(exc)))
        except BaseException:  # a bug: the parent shows the child's traceback
            events.put(("failed", index, "\n" + traceback.format_exc()))
        busy[0] = False
    events.cancel_join_thread()  # stopped: the parent no longer reads, so exiting must not wait on a full pipe


class ForkRunner:
    """``jobs`` forked processes fed arm indices through a queue."""

    def __init__(self, fn: ArmFn, jobs: int, linger: bool = False) -> None:
        """``linger``: a normal ``close`` only tells the children to leave, and ``join`` waits for them later: a child's
        exit (unmapping an address space as large as the parent's) then overlaps the parent's next work (its tables
        and figures) instead of delaying it. An abort still waits for them."""
        ctx = multiprocessing.get_context("fork")  # children inherit the loaded workload; no pickling of data or models
        self.capacity, self.linger, self.joined = jobs, linger, False
        self.tasks, self.events = ctx.Queue(), ctx.Queue()
        self.procs = [ctx.Process(target=_child_loop, args=(fn, self.tasks, self.events), daemon=True, name=f"zsgd-arm-{i}")
                      for i in range(jobs)]
        for p in self.procs:
            p.start()
        self.owner: dict[int, int] = {}  # pid -> arm index it is running
        self.pending: set[int] = set()  # handed out, not yet reported done or failed

    def start(self, index: int) -> None:
        self.pending.add(index)
        self.tasks.put(index)

    def poll(self, timeout: float) -> list[ArmEvent]:
        out: list[ArmEvent] = []
        try:
            kind, index, payload = self.events.get(timeout=timeout)
            while True:
                if kind == "started":
                    self.owner[payload] = index
                else:
                    if kind != "progress":
                        self.owner = {pid: i for pid, i in self.owner.items() if i != index}
                        self.pending.discard(index)
                    out.append(ArmEvent(kind, index, payload))
                kind, index, payload = self.events.get_nowait()
        except queue.Empty:
            pass
        if not out:  # only when the queue is quiet: a dead child's last words may still be in it
            for p in self.procs:  # children leave only when told to: any exit now is a death
                if p.exitcode is not None and self.pending:
                    # its "started" may have died with it: then blame an arm no live child claims
                    unclaimed = sorted(self.pending - set(self.owner.values()))
                    index = self.owner.pop(p.pid, unclaimed[0] if unclaimed else min(self.pending))
                    self.pending.discard(index)
                    out.append(ArmEvent("failed", index, f"its process died ({_exit_text(p.exitcode)})"))
                    break
        return out

    def close(self, abort: bool = False) -> None:
        """Let idle children leave (``None`` each); on abort SIGTERM them (a running arm ends with its summary,
        an idle child exits at once), then SIGKILL what is left after ``STOP_GRACE_S``."""
        if not abort:
            for _ in self.procs:
                self.tasks.put(None)
            if self.linger:
                return
        self.join(abort)

    def join(self, abort: bool = False) -> None:
        """Wait for the children (told to leave by ``close``; with ``abort``, terminated), as ``close`` describes."""
        if self.joined:
            return
        self.joined = True
        deadline = time.monotonic() + (0 if abort else 10)
        for p in self.procs:
            p.join(timeout=max(0.0, deadline - time.monotonic()))
        for p in self.procs:  # SIGTERM: a running arm ends with its summary (zsgd.simulation.interrupt), then exits
            if p.is_alive():
                p.terminate()
        deadline = time.monotonic() + STOP_GRACE_S
        for p in self.procs:
            p.join(timeout=max(0.0, deadline - time.monotonic()))
        for p in self.procs:
            if p.is_alive():
                p.kill()
                p.join(timeout=3)
        self.tasks.close()
        self.events.close()


def _exit_text(code: int) -> str:
    if code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"exit code {code}"


class CommandRunner:
    """One subprocess per arm, ``argv_of(index)``; its output goes to ``log_of(index)``.

    Each subprocess gets its own session, so a Ctrl-C in the terminal reaches
    only this process, which then ends them in order (SIGTERM: ``srun``
    forwards it to its step and the step ends)."""

    def __init__(self, argv_of: Callable[[int], list[str]], capacity: int, log_of: Callable[[int], Path],
                 env: dict[str, str] | None = None) -> None:
        self.argv_of, self.capacity, self.log_of, self.env = argv_of, capacity, log_of, env
        self.procs: dict[int, subprocess.Popen] = {}

    def start(self, index: int) -> None:
        log_path = self.log_of(index)
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "ab") as log:
            self.procs[index] = subprocess.Popen(self.argv_of(index), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                                 start_new_session=True, env=self.env)

    def poll(self, timeout: float) -> list[ArmEvent]:
        deadline = time.monotonic() + timeout
        while True:
            out = []
            for index, proc in list(self.procs.items()):
                code = proc.poll()
                if code is None:
                    continue
                del self.procs[index]
                if code == 0:
                    out.append(ArmEvent("done", index))
                else:
                    out.append(ArmEvent("failed", index, f"{_exit_text(code)}: {_tail(self.log_of(index))}"))
            if out or time.monotonic() >= deadline:
                return out
            time.sleep(0.05)

    def close(self, abort: bool = False) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 15
        for proc in self.procs.values():
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        self.procs.clear()


def _tail(path: Path, n: int = 3) -> str:
    try:
        lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return "(no output)"
    return " | ".join(lines[-n:]) or "(no output)"


class ArmsView:
    """One bar for the arms (queued, running, done) and one per running arm (its updates, virtual time, accuracy)."""

    def __init__(self, labels: list[str], total_updates: int | list[int | None] | None, enabled: bool, console: Any,
                 count: int | None = None, rules: list[Any] | None = None) -> None:
        """``labels[i]`` names arm ``i``; ``total_updates`` is one for all or one per arm; ``count`` arms are shown (default: all);
        ``rules[i]``, arm i's ``StopRule``: its bar's total follows the updates its rule will stop at, from the samples per
        update between two reports (a sync round is every worker's batch, not one)."""
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.labels, self.total, self.rules = labels, total_updates, rules
        self._last: dict[int, tuple[int, int]] = {}  # arm -> (updates, samples) at its previous report
        self.progress = Progress(TextColumn("[bold cyan]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[info]}"), TimeElapsedColumn(), console=console, disable=not enabled,
                                 refresh_per_second=4)
        n = len(labels) if count is None else count
        self.queued, self.running, self.done = n, 0, 0
        self.arms = self.progress.add_task("arms", total=n, info=self._counts())
        self.tasks: dict[int, Any] = {}

    def _counts(self) -> str:
        return f"{self.queued} queued · {self.running} running · {self.done} done"

    def __enter__(self) -> "ArmsView":
        self.progress.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.progress.stop()

    def started(self, index: int) -> None:
        self.queued, self.running = self.queued - 1, self.running + 1
        total = self.total[index] if isinstance(self.total, list) else self.total
        self.tasks[index] = self.progress.add_task(self.labels[index][:40], total=total, info="")
        self.progress.update(self.arms, info=self._counts())

    def arm_progress(self, index: int, p: tuple) -> None:
        import math

        updates, samples, t, acc = p
        if index in self.tasks:
            info = f"virtual {t:,.2f} s" + ("" if math.isnan(acc) else f"  acc {acc:.2%}")
            total = None
            if self.rules is not None:
                u0, s0 = self._last.get(index, (0, 0))
                if updates > u0:
                    total = self.rules[index].expected_updates(updates, samples, (samples - s0) / (updates - u0))
                    self._last[index] = (updates, samples)
            self.progress.update(self.tasks[index], completed=updates, info=info, total=total)

    def finished(self, index: int) -> None:
        self.running, self.done = self.running - 1, self.done + 1
        if index in self.tasks:
            self.progress.remove_task(self.tasks.pop(index))
        self.progress.update(self.arms, advance=1, info=self._counts())


def run_arms(indices: Iterable[int], runner: Any, view: ArmsView | None = None,
             on_done: Callable[[int, Any], None] | None = None) -> dict[int, Any]:
    """Run every arm in ``indices`` through ``runner``, at most ``runner.capacity`` at a time.

    Returns ``{index: payload}``. The first failure stops the others (their
    processes are ended) and raises ``ArmFailed`` naming the arm. Ctrl-C
    (``zsgd.simulation.interrupt``) starts no further arm, lets the running
    ones end with their summaries and raises KeyboardInterrupt."""
    from zsgd.simulation import interrupt

    waiting, running, results = deque(indices), set(), {}
    ok = False
    try:
        while waiting or running:
            if interrupt.requested():  # Ctrl-C: no further arm; the running ones end with a summary on close
                raise KeyboardInterrupt
            while waiting and len(running) < runner.capacity:
                index = waiting.popleft()
                running.add(index)
                if view:
                    view.started(index)
                runner.start(index)
            for ev in runner.poll(timeout=0.25):
                if ev.kind == "progress":
                    if view:
                        view.arm_progress(ev.index, ev.payload)
                    continue
                running.discard(ev.index)
                if ev.kind == "failed":
                    label = view.labels[ev.index] if view else str(ev.index)
                    raise ArmFailed(f"arm {label!r} failed: {ev.payload}")
                results[ev.index] = ev.payload
                if view:
                    view.finished(ev.index)
                if on_done:
                    on_done(ev.index, ev.payload)
        if interrupt.requested():  # the last arm ended interrupted: the sweep did not finish
            raise KeyboardInterrupt
        ok = True
    finally:
        runner.close(abort=not ok)
    return results
