"""Arms side by side start costliest first (``zsgd.simulation.parallel.longest_first``, ``sweep.arm_cost``), so
no slot idles while one long arm ends alone; and forked arm processes leave while the parent draws its figures
(``ForkRunner(linger=True)``). Neither changes what an arm writes: ``test_parallel_arms`` compares the bytes."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from helpers import wait_for
from zsgd.core.config import TrainConfig
from zsgd.core.problem import Problem
from zsgd.simulation.parallel import ArmsView, ForkRunner, longest_first, run_arms
from zsgd.simulation.sweep import SweepSpec, arm_cost, build_arms


def test_longest_first_keeps_the_index_order_among_equals():
    assert longest_first([1.0, 5.0, 1.0, float("inf"), 5.0]) == [3, 1, 4, 0, 2]
    assert longest_first([2.0, 2.0, 2.0]) == [0, 1, 2]
    assert longest_first([]) == []


def _costs(steps: int | None, epochs: float | None, algo: str, workers: str = "4") -> list[float]:
    cfg = TrainConfig(model="logreg", data="embedded", batch_size=32, steps=steps, epochs=epochs).validate()
    arms = build_arms(SweepSpec(grid={"algo": algo, "workers": workers}))
    rule = Problem.from_config(cfg).stop_rule(cfg)
    return [arm_cost(a, rule) for a in arms]


def test_an_arms_cost_counts_the_gradients_of_its_updates():
    # async and ssp: a gradient an update; sync and decentralized: a round of every worker; localsgd:K: K steps each
    assert _costs(100, None, "async,ssp:2,sync,localsgd:3,dsgd") == [100, 100, 400, 1200, 400]
    assert _costs(100, None, "sync", "2,8") == [200, 800]


def test_an_epoch_budget_caps_the_cost_and_a_target_alone_is_the_longest():
    by_epoch = _costs(None, 1.0, "async,sync")
    assert by_epoch[0] == by_epoch[1] > 0  # one epoch is the same batches whatever the rule
    assert _costs(10**9, 1.0, "async") == by_epoch[:1]
    cfg = TrainConfig(model="logreg", data="embedded", target_acc=0.5).validate()
    arm = build_arms(SweepSpec(grid={"algo": "async"}))[0]
    rule = Problem.from_config(cfg).stop_rule(cfg)
    assert rule.epochs is None and rule.steps is None  # a target alone: no count to stop at
    assert arm_cost(arm, rule) == float("inf")


_MARKS: list[Path] = []  # the folder where each arm of the running test marks its end (set before the fork)


def _arm_then_time(index: int, progress) -> tuple[int, float]:
    """An arm: index 2 is the long one, which ends only once the others have marked their end beside it (a runner
    that ran them after it, one at a time, fails it after 30 s); the others mark."""
    marks = _MARKS[-1]
    if index == 2:
        wait_for(lambda: len(list(marks.glob("done-*"))) >= 3, 30, interval=0.01, what="the short arms to end beside the long one")
    else:
        (marks / f"done-{index}").touch()
    return index, time.monotonic()


@pytest.mark.slow
def test_the_costliest_arm_starts_first_and_the_results_keep_their_indices(tmp_path):
    _MARKS.append(tmp_path)
    started: list[int] = []
    view = ArmsView([f"arm {i}" for i in range(4)], None, False, None)
    record = view.started
    view.started = lambda i: (started.append(i), record(i))  # type: ignore[method-assign]
    results = run_arms(longest_first([1, 1, 6, 1]), ForkRunner(_arm_then_time, 2), view)
    assert started == [2, 0, 1, 3]
    assert sorted(results) == [0, 1, 2, 3] and all(results[i][0] == i for i in results)
    assert max(results[i][1] for i in (0, 1, 3)) < results[2][1]  # the short ones ran beside the long one


@pytest.mark.slow
def test_a_lingering_runner_tells_its_children_to_leave_and_join_waits_for_them(tmp_path):
    _MARKS.append(tmp_path)
    runner = ForkRunner(_arm_then_time, 2, linger=True)
    results = run_arms(range(2), runner)
    assert sorted(results) == [0, 1]
    assert not runner.joined  # closed without waiting: the children were told to leave (None each)
    runner.join()
    assert runner.joined and not any(p.is_alive() for p in runner.procs)
    assert all(p.exitcode == 0 for p in runner.procs)  # they left as told, not killed
    runner.join()  # twice is harmless
