"""The step-exchange benchmark's three servers run and time what they name (a smoke test: no timing is asserted).

``benchmarks/bench_runtime.py --only exchange`` is how the exchange target is
reported; a benchmark that silently stopped stepping (the floor) or stopped
using shared memory would report a wrong ratio, not fail. This runs each
side for a few exchanges."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import zmq

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import bench_runtime  # noqa: E402


def _echo_reply(with_step: bool) -> np.ndarray:
    """The floor server's reply after two exchanges: its weights, stepped on each gradient when ``with_step``."""
    endpoint = f"tcp://127.0.0.1:{bench_runtime.free_port()}"
    args = [sys.executable, "-c", bench_runtime.ECHO_SERVER, endpoint, "1000"] + ([str(Path(__file__).resolve().parents[1])] if with_step else [])
    import subprocess

    server = subprocess.Popen(args, stdout=subprocess.PIPE, text=True)
    ctx = zmq.Context()
    d = ctx.socket(zmq.DEALER)
    d.linger = 0
    try:
        assert server.stdout.readline().strip() == "ready"
        d.connect(endpoint)
        for _ in range(2):
            d.send(np.ones(1000, np.float32), copy=False)
            assert d.poll(60_000), "the echo server did not answer"
            reply = np.frombuffer(d.recv(), np.float32)
        d.send(b"x")
        server.wait(timeout=30)
        return reply
    finally:
        d.close()
        ctx.term()
        if server.poll() is None:
            server.kill()
            server.wait()


@pytest.mark.slow
def test_the_floor_server_steps_on_what_it_gets_and_the_plain_echo_does_not():
    assert np.all(_echo_reply(False) == 1.0)
    stepped = _echo_reply(True)
    assert np.all(stepped < 1.0) and np.all(np.isfinite(stepped))  # two momentum steps on a gradient of ones


@pytest.mark.slow
@pytest.mark.parametrize("shared_memory", [False, True])
def test_the_zsgd_side_times_real_exchanges_with_a_broker(tmp_path, shared_memory):
    times = bench_runtime.zsgd_round_trip(3, tmp_path / "x", shared_memory=shared_memory)  # asserts the shm offer was taken
    assert len(times) == 3 and all(t > 0 for t in times)


@pytest.mark.slow
def test_the_end_to_end_breakdown_times_each_phase_of_real_workers(tmp_path):
    """``--only e2e --breakdown``: a real ``zsgd run`` with the wrappers, each worker's phases written and read back.
    Only consistency is checked (phases inside the step, the kernel inside the compute), never a duration. 3,000
    updates: the broker's CPU is sampled every 0.1 s, and the window both workers run in must hold two samples (400
    logreg updates ran in under 0.2 s on a quiet machine, and the figure was missing)."""
    import e2e_breakdown

    argv = ["run", "--n-proc", "2", "--model", "logreg", "--data", "embedded", "--algo", "async", "--steps", "3000", "--quiet",
            "--out", str(tmp_path / "run"), "--eval-every", "100000000", "--no-plots"]
    e2e_breakdown.run_instrumented(argv, tmp_path / "phases", bench_runtime.ENV, Path(__file__).resolve().parents[1])
    assert len(list((tmp_path / "phases").glob("phases-*.json"))) == 2  # one file per worker, none from the evaluator
    ms = e2e_breakdown.breakdown(tmp_path / "phases")
    assert 0 < ms["kernel"] <= ms["compute"] <= ms["step"]
    assert all(ms[k] >= 0 for k in ("send", "recv", "receive_copy", "kernel_cpu", "process_cpu"))
    assert ms["receive_copy"] <= ms["recv"] and ms["broker_cpu_per_update"] > 0
    rows = e2e_breakdown.breakdown_rows([ms], [])
    assert rows[0][1] == f"{ms['step']:.2f}" and all(len(r) == 5 for r in rows)
