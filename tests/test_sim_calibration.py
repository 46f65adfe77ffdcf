"""Reproducible by default (``zsgd.simulation.calibration``): the figures ``zsgd sim`` measures are cached per
machine, so the same command and seed give bit-identical metrics, with ``--jobs 1`` or ``--jobs 2`` and in
``zsgd experiment``; ``--calibration FILE`` replays a recorded calibration and ``--recalibrate`` measures again."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import yaml

from helpers import cli, lines_of, zsgd_cmd
from zsgd.errors import ZsgdError
from zsgd.simulation.calibration import Calibration, key_text

# Measured defaults throughout: no --compute, --broker-time or --broker-bandwidth.
GRID = ["--model", "logreg", "--data", "embedded", "--workers", "4", "--algo", "async,sync", "--steps", "300",
        "--eval-every", "100", "--seed", "3"]
KINDS = ("compute", "server_step", "transport")


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    """A calibration cache of this test alone (empty: the first run measures)."""
    path = tmp_path / "calibration"
    monkeypatch.setenv("ZSGD_CALIBRATION_DIR", str(path))
    return path


def arm_metrics(out: Path) -> dict[str, bytes]:
    return {p.parent.name: p.read_bytes() for p in sorted(out.glob("0*/metrics.jsonl"))}


def sim_in_process(out: Path, *args: str):
    r = cli("sim", *GRID, "--out", str(out), "--jobs", "1", *args)
    assert r.exit_code == 0, r.stderr[-2000:]
    return r


def sim_subprocess(out: Path, *args: str) -> subprocess.CompletedProcess:
    r = subprocess.run(zsgd_cmd("sim", *GRID, "--out", str(out), *args), capture_output=True, text=True, timeout=600,
                       stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stderr[-2000:]
    return r


def cached(cache_dir: Path) -> dict:
    (path,) = cache_dir.glob("*.json")
    return json.loads(path.read_text())


def measured_ns(doc: dict) -> dict[tuple[str, str], int]:
    return {(kind, k): e["measured_ns"] for kind in KINDS for k, e in doc.get(kind, {}).items()}


# -- the store ----------------------------------------------------------------------------------------


class Meter:
    """A measurement that counts its calls and gives a new figure each time (as timing a machine does)."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self) -> dict:
        self.calls += 1
        return {"samples": [0.001 * self.calls, 0.002 * self.calls]}


KEY = {"model": "mlp", "batch_size": 16, "momentum": 0.9}


def test_measured_once_per_machine_then_read_back_by_every_later_process(cache_dir):
    meter = Meter()
    first = Calibration().get("compute", KEY, meter)
    assert meter.calls == 1 and first["samples"] == [0.001, 0.002]
    assert Calibration().get("compute", KEY, meter) == first and meter.calls == 1  # a later process: the cache file
    assert Calibration().get("compute", KEY | {"batch_size": 32}, meter)["samples"] == [0.002, 0.004]  # another key: measured
    fresh = Calibration("recalibrate")
    assert fresh.get("compute", KEY, meter)["samples"] == [0.003, 0.006] and meter.calls == 3  # --recalibrate: measured again
    assert fresh.get("compute", KEY, meter)["samples"] == [0.003, 0.006] and meter.calls == 3  # once per process
    assert Calibration().get("compute", KEY, meter)["samples"] == [0.003, 0.006] and meter.calls == 3  # and it replaced the cached one
    assert len(list(cache_dir.glob("*.json"))) == 1


def test_a_record_replays_exactly_and_never_measures(cache_dir):
    meter = Meter()
    cal = Calibration()
    cal.get("compute", KEY, meter)
    cal.get("transport", {"message_bytes": 100}, lambda: {"bytes_per_s": 1.5e9, "overlap": 0.25, "lone_bytes_per_s": 2.5e9})
    record = json.loads(json.dumps(cal.record([("compute", KEY)])))  # what an arm's config.yaml holds
    assert set(record) == {"source", "machine", "compute"} and record["machine"]["cores"] >= 1
    replay = Calibration("replay", record, source="f.yaml")
    assert replay.get("compute", KEY, meter) == cal.get("compute", KEY, meter) and meter.calls == 1
    with pytest.raises(ZsgdError, match=r"--calibration f.yaml: no valid transport figure for message_bytes=100"):
        replay.get("transport", {"message_bytes": 100}, meter)  # not in the file: refused, not measured
    assert meter.calls == 1
    assert "replayed from f.yaml" in replay.summary()


def test_the_broker_loop_is_optional_in_a_replayed_record_and_checked_in_the_cache(cache_dir):
    """The broker's per-message cost (``broker_loop``) was added after records were made: a record without it replays
    as that run did (None: no cost charged, nothing measured); one with it replays it; a cached entry must be whole."""
    from zsgd.simulation.calibration import valid_entry

    meter = Meter()
    entry = {"samples": [0.004, 0.005], "steps": [0.001], "overhead_s": 0.0035}
    old = Calibration("replay", {"source": "old", "compute": {key_text(KEY): {"samples": [0.01]}}}, source="old.yaml")
    assert old.get("broker_loop", KEY, meter, optional=True) is None and meter.calls == 0
    with pytest.raises(ZsgdError, match="no valid broker per-message cost"):
        old.get("broker_loop", KEY, meter)  # asked for as a required figure: refused, as any other
    new = Calibration("replay", {"source": "new", "broker_loop": {key_text(KEY): entry}}, source="new.yaml")
    assert new.get("broker_loop", KEY, meter, optional=True) == entry and meter.calls == 0
    assert valid_entry("broker_loop", entry) and not valid_entry("broker_loop", {"samples": [0.004]})  # no overhead_s
    assert not valid_entry("broker_loop", entry | {"overhead_s": float("nan")})
    assert not valid_entry("transport", {"bytes_per_s": 1e9, "overlap": 0.5, "lone_bytes_per_s": 2e9, "lone_threads": 3.0})
    assert valid_entry("transport", {"bytes_per_s": 1e9, "overlap": 0.5, "lone_bytes_per_s": 2e9, "lone_threads": 0.8})


def test_a_damaged_cache_is_one_warning_and_a_new_measurement(cache_dir, capsys):
    meter = Meter()
    cal = Calibration()
    cal.get("compute", KEY, meter)
    path = cal.cache_path()
    path.write_text('{"machine": ')  # cut short
    assert Calibration().get("compute", KEY, meter)["samples"] == [0.002, 0.004] and meter.calls == 2
    doc = json.loads(path.read_text())
    doc["compute"][key_text(KEY)]["samples"] = ["fast"]  # one damaged entry
    path.write_text(json.dumps(doc))
    assert Calibration().get("compute", KEY, meter)["samples"] == [0.003, 0.006] and meter.calls == 3
    doc = json.loads(path.read_text())
    doc["machine"]["cpu"] = "another machine"  # a file copied from elsewhere under this machine's name
    path.write_text(json.dumps(doc))
    assert Calibration().get("compute", KEY, meter)["samples"] == [0.004, 0.008] and meter.calls == 4
    err = lines_of(capsys.readouterr().err)
    assert len(err) == 3 and all(line.startswith("warning: the calibration cache") for line in err), err
    assert "Traceback" not in "".join(err)


def test_an_unwritable_cache_warns_that_the_next_run_measures_again(tmp_path, monkeypatch, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("ZSGD_CALIBRATION_DIR", str(blocker / "calibration"))  # under a file: mkdir fails
    assert Calibration().get("compute", KEY, Meter())["samples"] == [0.001, 0.002]
    (line,) = lines_of(capsys.readouterr().err)
    assert "cannot write the calibration cache" in line and "the next run measures again" in line


@pytest.mark.parametrize("make, words", [
    (lambda d: d / "none.yaml", "no such file"),
    (lambda d: Path("/dev/zero"), "not a regular file"),  # a device: never read for ever
    (lambda d: (d / "x.yaml").write_text("model: mlp\nlr: 0.1\n") and d / "x.yaml", "holds no calibration"),
    (lambda d: (d / "x.json").write_bytes(b"compute: [unclosed") and d / "x.json", "neither JSON nor YAML"),
])
def test_bad_calibration_files_exit_2_with_one_line_before_any_work(tmp_path, make, words):
    r = cli("sim", *GRID, "--out", str(tmp_path / "out"), "--calibration", str(make(tmp_path)))
    assert r.exit_code == 2 and words in r.stderr and len(lines_of(r.stderr)) == 1, r.stderr
    assert not (tmp_path / "out").exists()


def test_calibration_and_recalibrate_together_exit_2(tmp_path):
    (tmp_path / "c.json").write_text('{"compute": {}}')
    for command in (["sim", *GRID, "--out", str(tmp_path / "out")], ["experiment", str(tmp_path / "exp.yaml")]):
        r = cli(*command, "--calibration", str(tmp_path / "c.json"), "--recalibrate")
        assert r.exit_code == 2 and "give one of them" in r.stderr and len(lines_of(r.stderr)) == 1, r.stderr


# -- whole runs ----------------------------------------------------------------------------------------


@pytest.mark.slow
def test_default_calibration_gives_bit_identical_metrics_twice_with_jobs_1_and_2(tmp_path, cache_dir):
    first = sim_in_process(tmp_path / "one")  # measures, and caches what it measured
    assert "calibration: 4 measured" in first.stderr  # compute, two server steps (async's and sync's), transport
    doc = cached(cache_dir)
    assert set(KINDS) <= set(doc) and len(doc["server_step"]) == 2  # async and sync each have their own step
    sim_in_process(tmp_path / "again")
    sim_subprocess(tmp_path / "two", "--jobs", "2")
    one = arm_metrics(tmp_path / "one")
    assert len(one) == 2 and one == arm_metrics(tmp_path / "again") == arm_metrics(tmp_path / "two")
    assert (tmp_path / "one" / "results.md").read_text() == (tmp_path / "two" / "results.md").read_text()
    assert measured_ns(cached(cache_dir)) == measured_ns(doc)  # nothing measured again
    # each arm records the figures it simulated with, and they are the ones its metrics used
    for arm in ("00-async", "01-sync"):
        recorded = yaml.safe_load((tmp_path / "two" / arm / "config.yaml").read_text())["calibration"]
        assert set(KINDS) <= set(recorded) and len(recorded["server_step"]) == 1
        start = json.loads((tmp_path / "two" / arm / "metrics.jsonl").read_text().splitlines()[0])
        (compute,) = recorded["compute"].values()
        assert start["compute_s"] == sorted(compute["samples"])[len(compute["samples"]) // 2]


@pytest.mark.slow
def test_recalibrate_measures_again_and_calibration_replays_a_recorded_one(tmp_path, cache_dir):
    sim_in_process(tmp_path / "one")
    before = measured_ns(cached(cache_dir))
    r = sim_in_process(tmp_path / "re", "--recalibrate")
    after = measured_ns(cached(cache_dir))
    assert set(after) == set(before) and all(after[k] != before[k] for k in before), r.stderr  # every figure measured again
    replayed = sim_in_process(tmp_path / "replay", "--calibration", str(tmp_path / "one" / "calibration.json"))
    assert "4 figure(s) replayed" in replayed.stderr
    assert arm_metrics(tmp_path / "replay") == arm_metrics(tmp_path / "one")  # the first run's figures, bit for bit
    assert measured_ns(cached(cache_dir)) == after  # a replay neither measures nor writes the cache
    # the figures really come from the file: a doctored compute time is what the arms simulate
    doc = yaml.safe_load((tmp_path / "one" / "01-sync" / "config.yaml").read_text())
    (key,) = doc["calibration"]["compute"]
    doc["calibration"]["compute"][key]["samples"] = [0.25]
    (tmp_path / "doctored.yaml").write_text(yaml.safe_dump(doc))
    sim_in_process(tmp_path / "doctored", "--algo", "sync", "--calibration", str(tmp_path / "doctored.yaml"))
    start = json.loads((tmp_path / "doctored" / "00-sync" / "metrics.jsonl").read_text().splitlines()[0])
    assert start["compute_s"] == 0.25
    # an arm's file lacks the other arm's server step: refused with one line, not a silent mix of machines
    r = cli("sim", *GRID, "--out", str(tmp_path / "mixed"), "-q", "--calibration", str(tmp_path / "one" / "00-async" / "config.yaml"))
    assert r.exit_code == 2 and "no valid server-step time" in r.stderr and len(lines_of(r.stderr)) == 1, r.stderr
    assert not (tmp_path / "mixed").exists()  # refused before anything is written


EXPERIMENT = """\
name: calib
problem: {model: logreg, data: embedded, batch_size: 16, steps: 200, eval_every: 100, seed: 5}
defaults: {workers: 4}
arms:
  - {name: async, algo: async}
  - {name: sync, algo: sync, latency: 2ms}
  - {name: dsgd, algo: dsgd}
"""


@pytest.mark.slow
def test_experiment_arms_use_the_same_cached_calibration(tmp_path, cache_dir):
    spec = tmp_path / "exp.yaml"
    spec.write_text(EXPERIMENT)
    r = cli("experiment", str(spec), "--out", str(tmp_path / "one"), "--jobs", "1", "-q")
    assert r.exit_code == 0, r.stderr[-2000:]
    two = subprocess.run(zsgd_cmd("experiment", str(spec), "--out", str(tmp_path / "two"), "--jobs", "2", "-q"), capture_output=True,
                         text=True, timeout=600, stdin=subprocess.DEVNULL)
    assert two.returncode == 0, two.stderr[-2000:]
    one = {p.parent.name: p.read_bytes() for p in sorted((tmp_path / "one").glob("*/metrics.jsonl"))}
    assert len(one) == 3 and one == {p.parent.name: p.read_bytes() for p in sorted((tmp_path / "two").glob("*/metrics.jsonl"))}
    assert len(cached(cache_dir)["compute"]) == 1  # one gradient-step time, measured once, for all three arms
    for arm in ("async", "dsgd"):
        (cfg,) = (tmp_path / "two").glob(f"*{arm}*/config.yaml")
        assert "compute" in yaml.safe_load(cfg.read_text())["calibration"]
