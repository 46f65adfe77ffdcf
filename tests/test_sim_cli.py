"""``zsgd sim`` end to end: a grid makes every arm and file, the same command
gives the same bytes, and bad specs exit 2 with one line naming the value."""

from __future__ import annotations

import csv
import json

import pytest

from helpers import cli

FAST = ["--model", "logreg", "--data", "embedded", "--compute", "2ms", "--eval-every", "20", "-q"]


def invoke(*args: str):
    return cli("sim", *args, catch_exceptions=False)


def test_grid_makes_every_arm_with_runtime_files_table_and_plots(tmp_path):
    out = tmp_path / "sweep"
    r = invoke("--workers", "4", "--algo", "async,sync,ssp:1", "--latency", "0,10ms", "--stragglers", "0.25:4x",
               "--steps", "40", "--target", "0.5", "--out", str(out), *FAST)
    assert r.exit_code == 0, r.output
    arms = sorted(p for p in out.iterdir() if p.is_dir())
    assert [a.name for a in arms] == ["00-async-lat0ms", "01-async-lat10ms", "02-sync-lat0ms", "03-sync-lat10ms",
                                      "04-ssp-1-lat0ms", "05-ssp-1-lat10ms"]
    for arm in arms:
        assert {"config.yaml", "metrics.jsonl", "summary.json", "weights.npz"} <= {p.name for p in arm.iterdir()}
        summary = json.loads((arm / "summary.json").read_text())
        assert summary["updates"] == 40 and summary["mode"] == "sim"
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["arm"] for r in rows] == ["async lat=0ms", "async lat=10ms", "sync lat=0ms", "sync lat=10ms", "ssp:1 lat=0ms", "ssp:1 lat=10ms"]
    assert {"final_acc", "time_to_target_s", "updates_per_s", "bytes_sent", "staleness_mean", "staleness_p50", "staleness_p99",
            "staleness_max", "algo", "latency"} <= set(rows[0])
    sync0 = rows[2]
    assert float(sync0["staleness_max"]) == 0
    lat = {r["arm"]: float(r["updates_per_s"]) for r in rows}
    assert lat["async lat=10ms"] < lat["async lat=0ms"]  # latency costs throughput
    md = (out / "results.md").read_text()
    assert md.count("\n| ") == 7  # header + 6 arms
    for png in ("accuracy_vs_time.png", "time_to_target.png", "staleness.png", "curves_vs_time.png"):
        assert (out / png).stat().st_size > 1000
    # `zsgd plot` reads simulated arms like real runs.
    plots = tmp_path / "plots"
    r = cli("plot", str(arms[0]), str(arms[2]), "--out", str(plots), catch_exceptions=False)
    assert r.exit_code == 0 and (plots / "curves_vs_time.png").is_file()


def test_same_command_same_bytes(tmp_path):
    args = ["--workers", "5", "--algo", "async", "--latency", "lognormal:5ms,0.5", "--compute", "normal:3ms,1ms",
            "--stragglers", "0.2:3x,transient:0.1:0.05", "--loss", "2%", "--steps", "60", "--model", "logreg",
            "--data", "embedded", "--eval-every", "20", "-q"]
    for name in ("a", "b"):
        assert invoke(*args, "--out", str(tmp_path / name)).exit_code == 0
    arm = "00-async"
    assert (tmp_path / "a" / arm / "metrics.jsonl").read_bytes() == (tmp_path / "b" / arm / "metrics.jsonl").read_bytes()


@pytest.mark.parametrize("flag,value", [
    ("--latency", "10parsecs"), ("--latency", "-5ms"), ("--latency", ""), ("--latency", "10"),
    ("--latency", "trace:/nonexistent/pings.csv"), ("--latency-up", "uniform:9ms,1ms"), ("--bandwidth", "fast"),
    ("--loss", "1.5"), ("--compute", "quick"), ("--stragglers", "1.5:2x"), ("--failures", "9@1s"), ("--algo", "hogwild"),
    ("--workers", "0"), ("--workers", "4,x"), ("--latency-worker", "3"), ("--retransmit", "-1s"), ("--detect", "soon"),
    ("--target", "2"),
])
def test_bad_specs_exit_2_with_one_line(tmp_path, flag, value):
    r = cli("sim", "--workers", "4", "--steps", "5", "--out", str(tmp_path / "x"), *FAST, flag, value)
    assert r.exit_code == 2, r.output
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("zsgd: error:"), r.stderr
    named = (value, value.split(",")[-1], value.partition(":")[2], flag)
    assert any(v and v in lines[0] for v in named) or not value, lines[0]
    assert not (tmp_path / "x").exists()  # nothing is written before the specs are valid


def test_empty_trace_file_is_an_error(tmp_path):
    f = tmp_path / "empty.csv"
    f.write_text("latency\n\n")
    r = cli("sim", "--latency", f"trace:{f}", "--steps", "5", *FAST)
    assert r.exit_code == 2 and "no numbers" in r.stderr


def test_more_workers_than_samples_fails_before_writing(tmp_path):
    r = cli("sim", "--workers", "4,20000", "--steps", "5", "--out", str(tmp_path / "x"), *FAST)
    assert r.exit_code == 2 and "20000 workers" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()


def test_decentralized_arms_in_a_grid(tmp_path):
    out = tmp_path / "d"
    r = invoke("--workers", "4", "--algo", "sync,dsgd,cadmm", "--topology", "torus", "--rho", "0.2", "--latency", "5ms", "--steps", "30",
               "--out", str(out), *FAST)
    assert r.exit_code == 0, r.output
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert [row["algo"] for row in rows] == ["sync", "dsgd", "cadmm"]
    cadmm = json.loads((out / rows[2]["dir"] / "summary.json").read_text())
    assert cadmm["sim"]["topology"] == "torus" and cadmm["sim"]["rho"] == 0.2 and cadmm["updates"] == 30
    assert json.loads((out / rows[1]["dir"] / "summary.json").read_text())["staleness_max"] == 0


@pytest.mark.parametrize("args, needle", [
    (["--algo", "async", "--topology", "ring"], None),  # the default graph named: harmless
    (["--algo", "async", "--rho", "0.1"], "add one to --algo"),
    (["--algo", "dsgd", "--rho", "0.1"], "parameter of cadmm"),
    (["--algo", "dsgd", "--failures", "1@1s"], "not modelled"),
    (["--algo", "dsgd", "--compress-replies", "topk:0.1"], "has none"),
    (["--algo", "dsgd", "--topology", "moebius"], "topology"),
])
def test_decentralized_flags_are_checked(tmp_path, args, needle):
    r = cli("sim", "--workers", "4", "--steps", "3", "--out", str(tmp_path / "x"), *FAST, *args)
    if needle is None:
        assert r.exit_code == 0, r.output
        return
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.exit_code == 2 and len(lines) == 1 and needle in lines[0], r.stderr
