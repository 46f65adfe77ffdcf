"""Local children forked from the run process: they behave as fresh ``python -m zsgd`` processes would."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys

import pytest

from helpers import run_zsgd, wait_for
from zsgd.runtime.launch.forked import ForkedProcess, fork_available, fork_command
from zsgd.runtime.launch.local import LocalLauncher

FAST = ["--model", "logreg", "--data", "embedded", "--batch-size", "32", "--lr", "0.05", "--heartbeat", "0.2", "--timeout", "1.5", "--quiet", "--no-plots"]  # the PNGs are tested where a test looks at them
pytestmark = [pytest.mark.skipif(not sys.platform.startswith("linux"), reason="children are forked on Linux only"), pytest.mark.slow]


def _unanswered_worker(port: int, join_timeout: str = "20") -> list[str]:
    return ["worker", "--connect", f"tcp://127.0.0.1:{port}", "--join-timeout", join_timeout, "--heartbeat", "0.2", "--timeout", "1"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_forked_child_is_a_fresh_process_of_its_own(tmp_path):
    listener = socket.create_server(("127.0.0.1", 0))  # stands for the broker's bound port
    previous = signal.signal(signal.SIGTERM, lambda *_: None)  # stands for the run's own SIGTERM handler
    try:
        child = fork_command(_unanswered_worker(_free_port()), tmp_path / "w.log", title="zsgd worker-7")
        assert isinstance(child, ForkedProcess) and child.poll() is None
        wait_for(lambda: open(f"/proc/{child.pid}/comm").read().strip() == "zsgd worker-7", 10, what="the child's name")
        assert os.getsid(child.pid) == child.pid  # its own session: a Ctrl-C in the terminal reaches the run alone
        inode = os.fstat(listener.fileno()).st_ino
        held = {os.readlink(f"/proc/{child.pid}/fd/{fd}") for fd in os.listdir(f"/proc/{child.pid}/fd")}
        assert f"socket:[{inode}]" not in held  # the parent's descriptors are closed in the child
        child.terminate()  # the parent's handler is not the child's: SIGTERM ends it
        assert child.wait(timeout=20) != 0 and child.poll() == child.returncode
        child.send_signal(signal.SIGKILL)  # reaped: never signals the pid again
    finally:
        signal.signal(signal.SIGTERM, previous)
        listener.close()


def test_a_forked_child_exits_with_the_commands_code_and_logs_its_error(tmp_path):
    child = fork_command(_unanswered_worker(_free_port(), "0.3"), tmp_path / "w.log", title="zsgd worker-0")
    assert child.wait(timeout=30) == 3
    log = (tmp_path / "w.log").read_text()
    assert "no broker answered" in log and "Traceback" not in log


def test_wait_with_a_timeout_raises_as_popen_does(tmp_path):
    child = fork_command(_unanswered_worker(_free_port()), tmp_path / "w.log", title="zsgd worker-0")
    try:
        with pytest.raises(subprocess.TimeoutExpired):
            child.wait(timeout=0.05)
    finally:
        child.kill()
        assert child.wait(timeout=10) == -signal.SIGKILL


def test_keys_reach_a_forked_child_on_its_stdin_pipe(tmp_path):
    child = fork_command(["worker", "--connect", "tcp://127.0.0.1:1", "--keys-stdin"], tmp_path / "w.log", title="zsgd worker-0",
                         stdin_pipe=True)
    child.stdin.write(b"not json\n")
    child.stdin.close()
    assert child.wait(timeout=30) == 2
    assert "keys" in (tmp_path / "w.log").read_text()


def test_the_launcher_forks_unless_told_to_exec(tmp_path, monkeypatch):
    launcher = LocalLauncher(f"tcp://127.0.0.1:{_free_port()}", tmp_path / "logs", heartbeat=0.2, timeout=0.5)
    assert fork_available()
    forked = launcher.start_one(0)
    monkeypatch.setenv("ZSGD_LOCAL_START", "exec")
    assert not fork_available()
    execd = launcher.start_one(1)
    try:
        assert isinstance(forked.proc, ForkedProcess) and isinstance(execd.proc, subprocess.Popen)
    finally:
        launcher.stop_all(grace=0)
    assert forked.returncode is not None and execd.returncode is not None


def test_no_fork_when_numpy_may_run_several_blas_threads(monkeypatch):
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "4")
    assert not fork_available()


def test_a_run_with_exec_started_workers_trains(tmp_path, no_orphans):
    """The interpreter path (ZSGD_LOCAL_START=exec, and every platform without fork) stays a working path."""
    out = tmp_path / "run"
    proc = run_zsgd("run", "--out", str(out), *FAST, "--n-proc", "2", "--steps", "200", env=os.environ | {"ZSGD_LOCAL_START": "exec"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["updates"] == 200 and summary["worker_deaths"] == 0


def test_warm_kernels_loads_the_models_kernels_before_the_fork_and_skips_language_models():
    """What a forked worker inherits: the cnn's training and evaluation kernels loaded in the run process."""
    from zsgd import kernels
    from zsgd.core.config import TrainConfig
    from zsgd.core.problem import Problem
    from zsgd.nn.conv import direct
    from zsgd.runtime.launch.forked import warm_kernels

    problem = Problem.from_config(TrainConfig(model="cnn", data="embedded").validate())
    warm_kernels(problem, "cnn")
    # the cnn's direct conv kernels (training and evaluation) and its loss; im2col is no longer on its path, and
    # whether another test in this process called it said nothing of the warm-up
    assert direct.forward.signatures and direct.backward_pooled.signatures and direct.dense_forward.signatures
    assert kernels.softmax_xent.signatures and kernels.xent_sum_correct.signatures
    lm = Problem.from_config(TrainConfig(model="lstm:embed=8,hidden=8,layers=1", data="text").validate())
    calls = []
    lm.model.loss_and_grad = lambda *a, **k: calls.append(a)
    warm_kernels(lm, "lstm:embed=8,hidden=8,layers=1")
    assert calls == []


def test_a_forked_command_that_succeeds_runs_none_of_the_parents_exit_handlers(tmp_path):
    """A successful command ends through quick_exit, which runs the exit handlers: the child's own, never the
    parent's it inherited (a test process's, whose clean-ups would act on the parent's files)."""
    import atexit

    marker = tmp_path / "parent-handler-ran"
    handler = marker.touch
    atexit.register(handler)
    try:
        child = fork_command(["data", "list"], tmp_path / "c.log", title="zsgd data")
        assert child.wait(timeout=60) == 0, (tmp_path / "c.log").read_text()
    finally:
        atexit.unregister(handler)
    assert "fashion-mnist" in (tmp_path / "c.log").read_text() and not marker.exists()

