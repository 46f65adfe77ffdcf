"""Arms side by side (``zsgd.simulation.parallel``): the same bytes as one at a time,
faster on two cores, a progress view that counts arms, and failures that name the arm."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from helpers import cli, lines_of, zsgd_cmd
from zsgd.errors import ZsgdError
from zsgd.simulation import parallel
from zsgd.simulation.parallel import ArmFailed, ArmsView, ForkRunner, InlineRunner, default_jobs, run_arms

GRID = ["--model", "logreg", "--data", "embedded", "--workers", "4", "--algo", "async,sync", "--latency", "0,10ms",
        "--compute", "2ms", "--broker-time", "0", "--eval-every", "200", "-q"]


def sim(out: Path, *args: str, env: dict | None = None, timeout: float = 600) -> tuple[subprocess.CompletedProcess, float]:
    t0 = time.perf_counter()
    proc = subprocess.run(zsgd_cmd("sim", *GRID, "--out", str(out), *args), capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL, env=env)
    return proc, time.perf_counter() - t0


def arm_metrics(out: Path) -> dict[str, bytes]:
    return {p.parent.name: p.read_bytes() for p in sorted(out.glob("0*/metrics.jsonl"))}


def _spin(seconds: float) -> int:
    """Busy work for ``seconds`` of wall time; returns how many rounds it got done."""
    end, n = time.perf_counter() + seconds, 0
    while time.perf_counter() < end:
        sum(range(10_000))
        n += 1
    return n


def two_cores_free() -> float:
    """How much more two spinning processes get done than one (about 2 when two cores are ours, 1 when we share one)."""
    import multiprocessing

    one = _spin(0.5)
    with multiprocessing.get_context("fork").Pool(2) as pool:
        two = sum(pool.map(_spin, [0.5, 0.5]))
    return two / max(one, 1)


@pytest.mark.slow
def test_jobs_2_writes_what_jobs_1_writes(tmp_path):
    one = cli("sim", *GRID, "--out", str(tmp_path / "one"), "--jobs", "1", "--steps", "600")  # one arm at a time: in this process
    two, _ = sim(tmp_path / "two", "--jobs", "2", "--steps", "600")
    assert one.exit_code == 0 and two.returncode == 0, one.stderr[-2000:] + two.stderr[-2000:]
    m1 = arm_metrics(tmp_path / "one")
    assert len(m1) == 4 and m1 == arm_metrics(tmp_path / "two")
    assert (tmp_path / "one" / "results.md").read_text() == (tmp_path / "two" / "results.md").read_text()


@pytest.mark.slow
def test_jobs_2_takes_at_most_0_6_of_the_time_of_jobs_1(tmp_path):
    """A timing check (3 minutes): run it on purpose, with ZSGD_TIMING=1, on a machine with 2 idle cores;
    the suite keeps no timing assertions (CI's machine is not ours to time)."""
    if os.environ.get("ZSGD_TIMING") != "1":
        pytest.skip("a wall-time check: run with ZSGD_TIMING=1 on idle cores")
    if default_jobs() < 2:
        pytest.skip("needs 2 cores")
    gain = two_cores_free()
    if gain < 1.7:  # other work on the machine takes a core: a wall-time ratio would measure that, not --jobs
        pytest.skip(f"two processes get only {gain:.2f}x the work of one done here right now: no 2 free cores to time --jobs 2 on")
    steps = ["--steps", "12000"]  # arms long enough that loading, calibration and plots (serial) are a small part
    one, t1 = sim(tmp_path / "one", "--jobs", "1", *steps)
    two, t2 = sim(tmp_path / "two", "--jobs", "2", *steps)
    assert one.returncode == 0 and two.returncode == 0, one.stderr[-2000:] + two.stderr[-2000:]
    m1, m2 = arm_metrics(tmp_path / "one"), arm_metrics(tmp_path / "two")
    assert len(m1) == 4 and m1 == m2
    assert (tmp_path / "one" / "results.md").read_text() == (tmp_path / "two" / "results.md").read_text()
    print(f"--jobs 1: {t1:.1f} s, --jobs 2: {t2:.1f} s ({t2 / t1:.2f}x)")
    assert t2 <= 0.6 * t1, f"--jobs 2 took {t2:.1f} s, --jobs 1 {t1:.1f} s ({t2 / t1:.2f}x; the machine may be busy)"


def _square(index: int, progress) -> int:
    for u in range(1, 4):
        progress(u, u * 32, u * 0.1, float("nan"))
    return index * index


@pytest.mark.slow
def test_fork_runner_returns_every_arm_and_the_view_counts_them():
    from rich.console import Console

    console = Console(record=True, width=120, force_terminal=False)
    view = ArmsView([f"arm {i}" for i in range(5)], 3, True, console)
    seen = []
    runner = ForkRunner(_square, 2)
    with view:
        results = run_arms(range(5), runner, view, on_done=lambda i, p: seen.append(view._counts()))
    assert results == {i: i * i for i in range(5)}
    assert seen[-1] == "0 queued · 0 running · 5 done"
    assert all(not p.is_alive() for p in runner.procs)
    inline = run_arms(range(3), InlineRunner(_square, lambda i, p: None))
    assert inline == {0: 0, 1: 1, 2: 4}


def _fails_on_two(index: int, progress) -> int:
    if index == 2:
        raise ZsgdError("latency trace ran out")
    if index == 3:
        os._exit(9)  # a child that dies without a word
    time.sleep(0 if index < 2 else 60)  # the others would run long: a failure must end them
    return index


@pytest.mark.slow
def test_a_failed_arm_names_itself_and_ends_the_others(monkeypatch):
    # the sleeping arms ignore the SIGTERM that would end a simulating arm with its summary: they are killed after
    # the grace, which is the product's 10 s for a cnn's final evaluation and need not be waited out here
    monkeypatch.setattr(parallel, "STOP_GRACE_S", 0.5)
    runner = ForkRunner(_fails_on_two, 3)
    view = ArmsView([f"arm {i}" for i in range(6)], None, False, None)
    with pytest.raises(ArmFailed, match=r"arm 'arm [23]' failed: (latency trace ran out|its process died \(exit code 9\))"):
        run_arms(range(6), runner, view)
    assert not any(p.is_alive() for p in runner.procs)


@pytest.mark.parametrize("args,env,needle", [
    (["--jobs", "0"], {}, "--jobs must be >= 1"),
    (["--launcher", "slurm"], {"SLURM_JOB_ID": None}, "not inside a Slurm allocation"),
    (["--launcher", "slurm"], {"SLURM_JOB_ID": "7", "SLURM_JOB_NODELIST": "n1", "SLURM_JOB_CPUS_PER_NODE": "2", "PATH": "/nonexistent"},
     "'srun' is not on PATH"),
])
def test_bad_launch_flags_exit_2_with_one_line_before_writing(tmp_path, args, env, needle):
    r = cli("sim", *GRID, "--steps", "10", "--out", str(tmp_path / "x"), *args, env=env)
    assert r.exit_code == 2, r.stderr
    assert len(lines_of(r.stderr)) == 1 and needle in r.stderr, r.stderr
    assert not (tmp_path / "x").exists()


def _dies(index: int, progress) -> int:
    os._exit(9)


@pytest.mark.slow
def test_a_child_that_dies_at_once_is_a_failed_arm_not_a_hang():
    with pytest.raises(ArmFailed, match=r"its process died \(exit code 9\)"):
        run_arms(range(2), ForkRunner(_dies, 1))


def test_each_arms_bar_totals_the_updates_the_arm_makes(tmp_path, monkeypatch):
    """An arm's bar ends at the update its stop rule stopped it (a sync round is every worker's batch, not one): its
    total follows the samples per update between the arm's reports (one every 32 updates; the first round of a sync
    arm holds one worker, so the total is exact from the second report on)."""
    import json

    seen: dict[int, float | None] = {}
    finished = ArmsView.finished

    def record(self, index: int) -> None:
        seen[index] = self.progress._tasks[self.tasks[index]].total
        finished(self, index)

    monkeypatch.setattr(ArmsView, "finished", record)
    out = tmp_path / "s"
    result = cli("sim", "--model", "logreg", "--data", "embedded", "--workers", "4", "--algo", "async,sync,localsgd:2",
                 "--compute", "2ms", "--broker-time", "0", "--epochs", "4", "--jobs", "1", "-q", "--out", str(out))
    assert result.exit_code == 0, result.output
    made = [json.loads(p.read_text())["updates"] for p in sorted(out.glob("0*/summary.json"))]
    assert len(made) == 3 and len(set(made)) == 3, made
    assert [seen[i] for i in range(3)] == made
