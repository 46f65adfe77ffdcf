"""zsgd on a real one-node Slurm cluster (``slurm_cluster.py``): the cluster itself,
``zsgd run`` inside an allocation, batch jobs cut by a signal and resumed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import REPO, cli, read_events, start_event, summary_of, wait_for, zsgd_processes


pytestmark = pytest.mark.slow


@pytest.mark.parametrize("package", ["slurm-wlm", "munge"])
def test_setup_script_installs_slurm(package):
    assert package in (REPO / "scripts" / "setup.sh").read_text()


def test_cluster_grants_more_tasks_than_cores(slurm):
    """config_overrides + CPUs=8: a 2-core machine grants 4 tasks, and the step runs them all."""
    out = slurm.client(["salloc", "-n", "4", "srun", "hostname"], timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [slurm.node] * 4
    slurm.wait_idle()


ZSGD = [sys.executable, "-m", "zsgd"]
FAST = ["--model", "logreg", "--data", "embedded", "--heartbeat", "1", "--timeout", "10", "--no-plots"]  # zsgd run only


def test_run_inside_salloc_starts_workers_as_one_srun_step(slurm, tmp_path, no_orphans):
    """No --n-proc inside an allocation: a note, 3 workers (4 CPUs, one kept for the broker) as an srun step, CURVE on."""
    out = tmp_path / "run"
    proc = slurm.client(["salloc", "-n", "4", *ZSGD, "run", *FAST, "--steps", "400", "--out", str(out)], timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "note: inside Slurm job" in proc.stderr and "--launcher slurm" in proc.stderr
    assert "3 workers start as an srun step" in proc.stderr and "(CURVE)" in proc.stderr
    s = summary_of(out)
    assert s["updates"] >= 400 and s["test_accuracy"] > 0.6, s
    assert s["n_workers"] == 3 and {w["host"] for w in s["workers"].values()} == {slurm.node}
    joined = {e["worker"] for e in read_events(out) if e["event"] == "worker" and e.get("role") == "worker"}
    assert joined == {0, 1, 2}  # ids from SLURM_PROCID
    assert "joined run" in (out / "logs" / "workers-srun.log").read_text()
    slurm.wait_idle()  # no step or job left behind


def test_ctrl_c_ends_the_workers_step(slurm, tmp_path, no_orphans):
    out = tmp_path / "run"
    salloc = subprocess.Popen(["salloc", "-n", "3", *ZSGD, "run", *FAST, "--steps", "1000000", "--quiet", "--out", str(out)],
                              env=slurm.env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              start_new_session=True)
    try:
        wait_for(lambda: any(e["event"] == "update" for e in read_events(out)), 120, what="the first update")
        assert any("zsgd-wor" in line for line in slurm.steps())
        os.kill(_broker_pid(out), signal.SIGINT)
        _, err = salloc.communicate(timeout=60)
    finally:
        if salloc.poll() is None:
            os.killpg(salloc.pid, signal.SIGKILL)
            salloc.communicate()
    assert "zsgd: interrupted" in err
    assert (out / "checkpoint.json").is_file()
    slurm.wait_idle(timeout=30)


def test_train_sbatch_cut_by_sigterm_resumes_to_the_same_update_count(slurm, tmp_path, no_orphans):
    """The example batch script, stopped mid-run by scancel --signal=TERM, then submitted again."""
    out = tmp_path / "run"
    env = slurm.env | {"ZSGD": f"{sys.executable} -m zsgd", "ZSGD_OUT": str(out)}
    args = ["--model", "logreg", "--data", "embedded", "--epochs", "1000", "--steps", "1500", "--checkpoint-every", "100",
            "--heartbeat", "1", "--timeout", "10", "--no-plots"]

    def submit() -> str:
        proc = slurm.client(["sbatch", "--parsable", "-n", "4", f"--chdir={tmp_path}", f"--output={tmp_path}/job-%j.out",
                             str(REPO / "examples/slurm/train.sbatch"), *args], env=env)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout.strip().split(";")[0]

    def finished(job: str) -> bool:
        return not slurm.client(["squeue", "-h", "-j", job], timeout=10).stdout.strip()

    first = submit()
    wait_for(lambda: (out / "checkpoint.json").exists() and json.loads((out / "checkpoint.json").read_text())["updates"] >= 300,
             180, what="a checkpoint at 300 updates")
    assert slurm.client(["scancel", "--signal=TERM", first]).returncode == 0
    wait_for(lambda: finished(first), 120, what="the signalled job to end")
    cut = json.loads((out / "checkpoint.json").read_text())["updates"]
    s = summary_of(out)
    assert 300 <= cut < 1500 and s["updates"] == cut and "srun step ended" in s["stop_reason"], s["stop_reason"]
    second = submit()
    wait_for(lambda: finished(second), 300, what="the resubmitted job to finish")
    log = (tmp_path / f"job-{second}.out").read_text()
    assert "continuing" in log or "reached 1500 updates" in log, log[-2000:]
    s = summary_of(out)
    assert s["updates"] == 1500 and s["stop_reason"] == "reached 1500 updates", s
    starts = [e for e in read_events(out) if e["event"] == "start"]
    assert [e["resumed"] for e in starts] == [False, True]
    slurm.wait_idle()


def test_sim_grid_under_slurm_writes_what_jobs_1_writes(slurm, tmp_path, no_orphans):
    grid = ["sim", "--model", "logreg", "--data", "embedded", "--workers", "4", "--algo", "async,sync", "--latency", "0,10ms",
            "--compute", "2ms", "--broker-time", "0", "--steps", "300", "--eval-every", "100", "-q"]  # timings fixed: comparable bytes
    local = cli(*grid, "--jobs", "1", "--out", str(tmp_path / "local"))  # the reference, one arm at a time: in this process
    assert local.exit_code == 0, local.stderr[-2000:]
    steps = slurm.client(["salloc", "-n", "4", *ZSGD, *grid, "--launcher", "slurm", "--out", str(tmp_path / "slurm")], timeout=300)
    assert steps.returncode == 0, steps.stderr[-2000:]
    arms = sorted(p.name for p in (tmp_path / "local").glob("0*"))
    assert len(arms) == 4
    for arm in arms:
        assert (tmp_path / "local" / arm / "metrics.jsonl").read_bytes() == (tmp_path / "slurm" / arm / "metrics.jsonl").read_bytes()
        assert "zsgd-arm" not in (tmp_path / "slurm" / arm / "step.log").read_text()  # the step ran zsgd sim-arm quietly
    assert (tmp_path / "local" / "results.md").read_text() == (tmp_path / "slurm" / "results.md").read_text()
    slurm.wait_idle()


def test_bad_slurm_launches_are_one_line_exit_2(slurm, tmp_path):
    cases = [
        (["salloc", "-n", "1", *ZSGD, "run", *FAST, "--launcher", "slurm", "--steps", "10", "--out", str(tmp_path / "a")],
         "none left for workers"),
        (["salloc", "-n", "2", *ZSGD, "run", *FAST, "--launcher", "slurm", "--n-proc", "4", "--steps", "10", "--out", str(tmp_path / "b")],
         "the allocation is too small: 4 worker(s) + 1 CPU for the broker need 5 CPUs"),
        ([*ZSGD, "run", *FAST, "--launcher", "slurm", "--steps", "10", "--out", str(tmp_path / "c")], "not inside a Slurm allocation"),
    ]
    for argv, needle in cases:
        proc = slurm.client(argv, timeout=120)
        err = "\n".join(line for line in proc.stderr.splitlines() if not line.startswith("salloc:"))
        assert proc.returncode == 2 and needle in err and err.strip().count("\n") == 0, (argv, proc.returncode, proc.stderr)
    slurm.wait_idle()


def test_srun_missing_from_path_is_one_line_exit_2(tmp_path):
    """No cluster needed: an allocation's variables without srun on PATH."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")} | {
        "SLURM_JOB_ID": "7", "SLURM_JOB_NODELIST": "n1", "SLURM_JOB_CPUS_PER_NODE": "4", "PATH": "/nonexistent"}
    proc = subprocess.run([*ZSGD, "run", *FAST, "--steps", "10", "--out", str(tmp_path / "x")], capture_output=True, text=True,
                          timeout=120, stdin=subprocess.DEVNULL, env=env)
    assert proc.returncode == 2 and "'srun' is not on PATH" in proc.stderr, proc.stderr
    assert proc.stderr.strip().count("\n") == 1 and proc.stderr.startswith("note: inside Slurm job 7")  # the note, then the error


def test_sigterm_checkpoints_and_resume_auto_continues(tmp_path, no_orphans):
    """What a time limit does (no cluster needed): SIGTERM to zsgd run -> checkpoint, summary, exit 0;
    the same command with --resume auto then ends at the same total update count."""
    out = tmp_path / "run"
    cmd = [*ZSGD, "run", "--n-proc", "2", *FAST, "--steps", "1200", "--checkpoint-every", "100", "--resume", "auto", "--quiet",
           "--out", str(out)]
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        wait_for(lambda: (out / "checkpoint.json").exists() and json.loads((out / "checkpoint.json").read_text())["updates"] >= 200,
                 180, what="a checkpoint at 200 updates")
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    assert proc.returncode == 0, err[-2000:]
    s = summary_of(out)
    assert s["stop_reason"].startswith("stopped by SIGTERM") and s["updates"] < 1200
    assert json.loads((out / "checkpoint.json").read_text())["updates"] == s["updates"]
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "--resume auto: continuing" in again.stderr
    s = summary_of(out)
    assert s["updates"] == 1200 and s["stop_reason"] == "reached 1200 updates"


def _broker_pid(out: Path) -> int:
    """The 'zsgd run' process of this test, from its start event: its forked children (the evaluator)
    and salloc hold the same words in their command lines."""
    return start_event(out)["pid"]


def test_a_dead_task_is_a_dead_worker(slurm, tmp_path, no_orphans):
    """kill -9 of one srun task: the broker counts a death and the other workers carry on; SIGTERM then ends the run cleanly."""
    out = tmp_path / "run"
    salloc = subprocess.Popen(["salloc", "-n", "4", *ZSGD, "run", *FAST, "--heartbeat", "0.2", "--timeout", "1.5", "--steps", "1000000", "--quiet",
                               "--out", str(out)],
                              env=slurm.env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              start_new_session=True)

    def events(kind: str) -> list[dict]:
        return [e for e in read_events(out) if e["event"] == kind]

    try:
        wait_for(lambda: len(events("update")) > 50, 120, what="workers at work")
        pids = {e["worker"]: e["pid"] for e in events("worker") if e.get("role") == "worker" and e.get("pid")}
        os.kill(pids[1], signal.SIGKILL)
        wait_for(lambda: any(e["worker"] == 1 and e["status"] == "dead" for e in events("worker")), 60, what="worker 1 declared dead")
        mark = len(events("update"))
        wait_for(lambda: len(events("update")) > mark + 100, 60, what="updates after the death")
        os.kill(_broker_pid(out), signal.SIGTERM)
        _, err = salloc.communicate(timeout=120)
    finally:
        if salloc.poll() is None:
            os.killpg(salloc.pid, signal.SIGKILL)
            salloc.communicate()
    assert salloc.returncode == 0, err[-2000:]
    s = summary_of(out)
    assert s["worker_deaths"] >= 1 and s["stop_reason"].startswith("stopped by SIGTERM"), s
    assert {e["worker"] for e in events("update")[mark:]} <= {0, 2}  # the survivors carried on
    slurm.wait_idle()


def test_sweep_sbatch_gathers_its_arms(slurm, tmp_path, no_orphans):
    out = tmp_path / "sweep"
    env = slurm.env | {"ZSGD": f"{sys.executable} -m zsgd", "ZSGD_OUT": str(out)}
    proc = slurm.client(["sbatch", "--parsable", "--wait", "-n", "3", f"--chdir={tmp_path}", f"--output={tmp_path}/job-%j.out",
                         str(REPO / "examples/slurm/sweep.sbatch"), "--workers", "4", "--algo", "async", "--latency", "0,10ms",
                         "--stragglers", "none", "--steps", "100", "--compute", "2ms"], env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr + "".join(p.read_text() for p in tmp_path.glob("job-*.out"))
    assert sorted(p.name for p in out.glob("0*")) == ["00-lat0ms", "01-lat10ms"]
    assert (out / "results.md").read_text().count("\n| ") == 3 and (out / "accuracy_vs_time.png").is_file()
    slurm.wait_idle()


def test_experiment_under_slurm_writes_what_jobs_1_writes(slurm, tmp_path, no_orphans):
    text = (REPO / "examples/compare_small.yaml").read_text()
    assert "\ndefaults:\n" in text
    (tmp_path / "exp.yaml").write_text(text.replace("\ndefaults:\n", "\ndefaults:\n  broker_time: 0       # fixed, as compute is: comparable bytes\n"))
    config = str(tmp_path / "exp.yaml")
    only = ["--only", "async", "--only", "dsgd-ring", "-q"]
    local = cli("experiment", config, *only, "--jobs", "1", "--out", str(tmp_path / "local"))  # the reference: in this process
    assert local.exit_code == 0, local.stderr[-2000:]
    steps = slurm.client(["salloc", "-n", "2", *ZSGD, "experiment", config, *only, "--launcher", "slurm", "--out", str(tmp_path / "slurm")],
                         timeout=300)
    assert steps.returncode == 0, steps.stderr[-2000:]
    arms = sorted(p.name for p in (tmp_path / "local").glob("0*"))
    assert len(arms) == 2
    for arm in arms:
        assert (tmp_path / "local" / arm / "metrics.jsonl").read_bytes() == (tmp_path / "slurm" / arm / "metrics.jsonl").read_bytes()
    slurm.wait_idle()


def _ppid(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def test_ctrl_c_ends_the_sweeps_arm_steps(slurm, tmp_path, no_orphans):
    out = tmp_path / "sweep"
    salloc = subprocess.Popen(["salloc", "-n", "2", *ZSGD, "sim", "--model", "logreg", "--data", "embedded", "--workers", "4",
                               "--latency", "0,10,20ms", "--compute", "2ms", "--steps", "100000000", "-q", "--launcher", "slurm",
                               "--out", str(out)],
                              env=slurm.env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              start_new_session=True)
    try:
        wait_for(lambda: sum("zsgd-arm" in line for line in slurm.steps()) == 2, 120, what="two arm steps running")
        wait_for(lambda: (out / "00-lat0ms" / "metrics.jsonl").exists(), 120, what="the first arm at work")
        argv = {pid: Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0") for pid in zsgd_processes()}
        sims = {pid for pid, a in argv.items() if a[0] == sys.executable.encode() and a[3:4] == [b"sim"]}
        # the command's own process: its figure helpers (zsgd.output.plotter) are forked from it, with its command line
        parent = next(pid for pid in sims if _ppid(pid) not in sims)
        os.kill(parent, signal.SIGINT)
        _, err = salloc.communicate(timeout=60)
    finally:
        if salloc.poll() is None:
            os.killpg(salloc.pid, signal.SIGKILL)
            salloc.communicate()
    assert "zsgd: interrupted" in err, err[-2000:]
    slurm.wait_idle(timeout=30)
