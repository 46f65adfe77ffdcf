"""The server benchmarks' own logic: K-scaling rows against the goal, bad lists refused, the profile's split, and a
synthetic worker that still joins a real broker (a smoke test: no timing is asserted).

``bench_broker.py`` could not join ``zsgd broker`` for a while (the run secret came in and its workers had no proof)
and nothing failed: the last test would have."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import bench_server_capacity as cap  # noqa: E402
import broker_profile  # noqa: E402


def test_scaling_rows_compare_each_k_with_its_goal():
    rows = cap.scaling_rows({1: 100.0, 2: 170.0, 4: 300.0, 8: 500.0})
    by_k = {r.split("|")[1].strip(): [c.strip() for c in r.split("|")[1:-1]] for r in rows[2:]}
    assert by_k["2"][2:] == ["1.70", ">= 1.6", "yes"]
    assert by_k["4"][2:] == ["3.00", ">= 3.2", "no"]  # 0.75 K: short of 0.8 K
    assert by_k["8"][3:] == ["(none past K = 4)", ""]
    assert cap.scaling_rows({2: 1.0}) == ["(no K = 1 measured: no ratio to it)"]


@pytest.mark.parametrize("text", ["x", "0", "1,,2", "", "-1"])
def test_bad_lists_are_one_line_refusals(text):
    with pytest.raises(SystemExit) as exc:
        cap.whole_list(text, "--servers")
    assert str(exc.value).startswith("--servers takes whole numbers") and "\n" not in str(exc.value)


def test_profile_sorts_samples_by_thread_and_code():
    assert broker_profile._kind("ZMQbg/IO/0", "7", "9", "[kernel.kallsyms])") == ("ZeroMQ I/O thread", "kernel (TCP copies, system calls)")
    assert broker_profile._kind("python3", "7", "7", "/tmp/perf-7.map)") == ("main thread", "numba kernels (the step)")
    assert broker_profile._kind("python3", "7", "8", "/usr/lib/libpython3.11.so)")[0] == "other Python threads (pyzmq gc)"
    lines = broker_profile.perf_table({("main thread", "Python interpreter"): 0.01}, 100, {("main thread", "Python interpreter"): 0.04}, 100)
    assert lines[-2] == "| main thread | Python interpreter | 100 | 400 | +300 |" and "+300" in lines[-1]


@pytest.mark.slow
def test_a_synthetic_worker_joins_a_real_broker(tmp_path):
    import bench_broker

    rate = bench_broker.measure("zsgd", 1, 1, 1, seconds=0.5, warmup=0.2, out=tmp_path / "run")  # any exchange at all
    assert rate > 0
