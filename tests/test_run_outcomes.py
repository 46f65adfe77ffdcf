"""How runs end, in every mode: the same summary keys, divergence said and ended, junk never buffered."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
import zmq

from helpers import broker_address, cli, read_events, run_zsgd, start_worker, start_zsgd, stop, wait_for, wait_for_updates
from helpers import summary_of as summary
from zsgd.core.ledger import CORE_SUMMARY_KEYS

TINY = ["--model", "logreg", "--data", "embedded", "--batch-size", "32", "--lr", "0.05"]
NET = ["--heartbeat", "0.2", "--timeout", "1.5", "--quiet", "--no-plots"]  # the PNGs are tested where a test looks at them


@pytest.mark.slow
def test_every_mode_writes_the_same_core_summary_keys(tmp_path):
    """train, run, sim, and both decentralized drivers keep one ledger: the core keys and their types agree."""
    runs = {
        "train": ["train", *TINY, "--steps", "40", "--quiet"],
        "run": ["run", "--n-proc", "2", *TINY, "--steps", "40", *NET],
        "sim": ["sim", "--workers", "2", *TINY, "--steps", "40"],
        "sim-dsgd": ["sim", "--workers", "3", "--algo", "dsgd", *TINY, "--steps", "10"],
        "run-dsgd": ["run", "--n-proc", "3", "--algo", "dsgd", *TINY, "--steps", "10", *NET],
    }
    found = {}
    # The real runs (processes) go in the background while the one-process modes run here (no interpreter
    # to start, no data set to load again).
    procs = {name: start_zsgd(*args, "--out", str(tmp_path / name)) for name, args in runs.items() if args[0] == "run"}
    try:
        for name, args in runs.items():
            if name not in procs:
                result = cli(*args, "--out", str(tmp_path / name))
                assert result.exit_code == 0, f"{name}: {result.stderr[-2000:]}"
        for name, proc in procs.items():
            _, err = proc.communicate(timeout=240)
            assert proc.returncode == 0, f"{name}: {err[-2000:]}"
    finally:
        stop(*procs.values(), group=True)
    for name in runs:
        out = tmp_path / name
        arm = out if (out / "summary.json").exists() else next(p for p in sorted(out.iterdir()) if (p / "summary.json").exists())
        found[name] = summary(arm)
    for name, s in found.items():
        missing = set(CORE_SUMMARY_KEYS) - set(s)
        assert not missing, f"{name} lacks {sorted(missing)}"
        assert s["diverged"] is False and s["stop_reason"].startswith("reached"), (name, s["stop_reason"])
    kinds = {k: {name: type(s[k]).__name__ for name, s in found.items()} for k in CORE_SUMMARY_KEYS if k != "stop_reason"}
    for key, types in kinds.items():
        assert len(set(types.values()) - {"NoneType"}) <= 1 or set(types.values()) <= {"int", "float"}, (key, types)


@pytest.mark.slow
def test_a_diverging_trainer_says_so_and_exits_3(tmp_path):
    out = tmp_path / "train"
    proc = cli("train", "--model", "logreg", "--data", "embedded", "--lr", "1e6", "--quiet", "--out", str(out))  # one process: in this one
    assert proc.exit_code == 3, proc.stderr[-2000:]
    assert "diverged at update" in proc.stderr.splitlines()[-1]
    s = summary(out)
    assert s["diverged"] is True and s["stop_reason"].startswith("diverged at update")
    assert s["updates"] < 157  # it stopped before the epoch ran out


@pytest.mark.slow
def test_a_diverging_distributed_run_ends_instead_of_hanging(tmp_path, no_orphans):
    """The probe's hang: workers crashed encoding a NaN loss and the broker waited for ever. Sync rounds make the
    blow-up deterministic (async lr 5 sometimes only stalls at 10 % accuracy with a flat loss, which no loss rule can call)."""
    out = tmp_path / "run"
    proc = run_zsgd("run", "--n-proc", "2", "--algo", "sync", "--model", "mlp", "--data", "embedded", "--lr", "50", "--steps", "200", *NET,
                    "--out", str(out), timeout=180)
    assert proc.returncode == 3, proc.stderr[-2000:]
    s = summary(out)
    assert s["diverged"] is True and "diverged at update" in s["stop_reason"]
    for log in (out / "logs").glob("worker-*.log"):
        assert "Traceback" not in log.read_text(), log.read_text()[-2000:]


@pytest.mark.slow
def test_diverging_sim_arms_are_marked_and_the_sweep_goes_on(tmp_path):
    out = tmp_path / "sim"
    proc = cli("sim", "--workers", "2", "--model", "logreg", "--data", "embedded", "--lr", "1e6", "--latency", "0,10ms",
               "--steps", "150", "--out", str(out))
    assert proc.exit_code == 0, proc.stderr[-2000:]
    arms = {p.name: summary(p) for p in sorted(out.iterdir()) if (p / "summary.json").exists()}
    assert len(arms) == 2, "the sweep stopped at the first diverged arm"
    assert all(s["diverged"] and s["stop_reason"].startswith("diverged at update") for s in arms.values())
    table = (out / "results.md").read_text()
    assert table.count("diverged") >= 2, table


@pytest.mark.slow
def test_a_junk_frame_larger_than_the_model_is_never_buffered(tmp_path, no_orphans):
    """A peer on the open port sends one 256 MB frame: libzmq drops it unread (the socket's size limit
    comes from the model), the broker's memory does not grow by the frame, and training goes on."""
    out = tmp_path / "run"
    broker = start_zsgd("broker", "--workers", "1", "--no-evaluator", *TINY, "--time", "40", *NET, "--out", str(out))
    worker = None
    ctx = zmq.Context()
    try:
        address = broker_address(out)
        worker = start_worker(address, "--heartbeat", "0.2", "--timeout", "1.5", "-q", keys=out / "keys")
        wait_for_updates(out, 1)
        rss_before = _rss_kib(broker.pid)
        attacker = ctx.socket(zmq.DEALER)
        attacker.linger = 0
        attacker.connect(address)
        junk = bytearray(256 << 20)
        attacker.send_multipart([b"ZS\x01\x04{}", junk], copy=False)
        del junk
        updates_then = _updates(out)
        wait_for(lambda: _updates(out) > updates_then + 200, 60, what="training to go on after the junk frame")
        rss_after = _rss_kib(broker.pid)
        assert rss_after - rss_before < 64 << 10, (rss_before, rss_after)  # far less than the 256 MB frame
        attacker.close()
        broker.send_signal(signal.SIGTERM)  # seen what it had to show: end it as a time limit would (--time is a bound)
        _, err = broker.communicate(timeout=120)
        assert broker.returncode == 0, err[-2000:]
    finally:
        ctx.term()
        stop(broker, group=True)
        if worker is not None:
            worker.wait(timeout=30)
    s = summary(out)
    assert s["dropped_connections"] >= 1 and s["rejected_messages"] == 0


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def _updates(out: Path) -> int:
    return max((e["updates"] for e in read_events(out) if e["event"] == "update"), default=0)
