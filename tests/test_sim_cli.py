"""``zsgd sim`` end to end: a grid makes every arm and file, the same command
gives the same bytes, and bad specs exit 2 with one line naming the value."""

from __future__ import annotations

import csv
import json

import pytest

from helpers import cli, run_zsgd

FAST = ["--model", "logreg", "--data", "embedded", "--compute", "2ms", "--eval-every", "20", "-q"]


def invoke(*args: str):
    return cli("sim", *args, catch_exceptions=False)


@pytest.mark.slow  # a whole simulated sweep: several seconds
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
    # Given compute and broker times: measured ones (the defaults) depend on this machine at this moment.
    args = ["--workers", "5", "--algo", "async", "--latency", "lognormal:5ms,0.5", "--compute", "normal:3ms,1ms", "--broker-time", "0.1ms",
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
    ("--target", "2"), ("--broker-bandwidth", "fast"),
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


# ---------------------------------------------------------------------------
# the defaults of 'zsgd run': unset batch size and lr follow each arm's workers

SMALL = ["--model", "logreg", "--data", "embedded", "--compute", "2ms", "--steps", "10"]


def arm_configs(out) -> dict[str, dict]:
    import yaml

    return {row["arm"]: yaml.safe_load((out / row["dir"] / "config.yaml").read_text()) for row in csv.DictReader(open(out / "results.csv"))}


@pytest.mark.slow  # a whole simulated sweep: several seconds
def test_unset_batch_and_lr_follow_each_arms_workers_as_in_run(tmp_path):
    from zsgd.core.config import TrainConfig
    from zsgd.algorithms.scaling import SCALED_FIELDS, scale_for_workers

    out = tmp_path / "s"
    r = invoke("--workers", "2,4", "--algo", "async,sync,localsgd:2", "--out", str(out), *SMALL)
    assert r.exit_code == 0, r.output
    lines = [ln for ln in r.stderr.splitlines() if "scaled" in ln]
    assert len(lines) == 1 and lines[0].startswith("scaled per arm from batch 64, lr 0.05: async x2: batch 32"), r.stderr
    assert "localsgd:2 x4: as given" in lines[0] and "--literal" in lines[0]
    configs = arm_configs(out)
    assert len(configs) == 6
    for arm, stored in configs.items():
        algo, n = stored["sim"]["algo"], stored["sim"]["n_workers"]
        expected, note = scale_for_workers(TrainConfig(), algo, n, set(SCALED_FIELDS))  # what 'zsgd run' uses
        assert (stored["batch_size"], stored["momentum"]) == (expected.batch_size, 0.9), arm
        assert stored["lr"] == pytest.approx(expected.lr), arm
        assert stored["sim"]["scaling"] == note, arm
    assert configs["async n=4"]["batch_size"] == 16 and configs["localsgd:2 n=2"]["lr"] == 0.05


@pytest.mark.slow  # a whole simulated sweep: several seconds
def test_literal_keeps_every_value_and_given_values_are_never_scaled(tmp_path):
    r = invoke("--workers", "4", "--algo", "async,sync", "--literal", "--out", str(tmp_path / "lit"), *SMALL)
    assert r.exit_code == 0, r.output
    assert "scaled" not in r.stderr
    for stored in arm_configs(tmp_path / "lit").values():
        assert (stored["batch_size"], stored["lr"], stored["sim"]["scaling"]) == (64, 0.05, None)
    conf = tmp_path / "c.yaml"
    conf.write_text("batch_size: 64\n")  # a value in a file counts as given, as in 'zsgd run'
    r = invoke("--workers", "4", "--algo", "sync", "--config", str(conf), "--out", str(tmp_path / "file"), *SMALL)
    assert r.exit_code == 0, r.output
    (stored,) = arm_configs(tmp_path / "file").values()
    assert stored["batch_size"] == 64 and stored["lr"] == pytest.approx(0.2)  # lr x N, batch as given
    assert "lr 0.05 -> 0.2" in stored["sim"]["scaling"]


@pytest.mark.slow  # a whole simulated sweep: several seconds
def test_unset_eval_every_gives_a_curve_not_one_point(tmp_path):
    """The delay study needs a time to target: with --eval-every unset, a sim arm evaluates as a run does
    (the ledger's cadence, several points per run), not once at the end of its single epoch."""
    from zsgd.core.ledger import EVALS_PER_RUN

    out = tmp_path / "e"
    r = invoke("--workers", "4", "--algo", "async,sync", "--model", "logreg", "--data", "embedded", "--compute", "2ms", "--steps", "100",
               "-q", "--out", str(out))
    assert r.exit_code == 0, r.output
    for row in csv.DictReader(open(out / "results.csv")):
        evals = [json.loads(ln) for ln in (out / row["dir"] / "metrics.jsonl").read_text().splitlines() if '"eval"' in ln]
        assert len(evals) >= EVALS_PER_RUN and evals[0]["updates"] <= 100 // EVALS_PER_RUN + 1, (row["arm"], evals)
    r = invoke("--workers", "4", "--model", "logreg", "--data", "embedded", "--compute", "2ms", "--steps", "100", "--eval-every", "50",
               "-q", "--out", str(tmp_path / "given"))
    evals = [ln for ln in (tmp_path / "given" / "00-async" / "metrics.jsonl").read_text().splitlines() if '"eval"' in ln]
    assert r.exit_code == 0 and len(evals) == 2


# ---------------------------------------------------------------------------
# tables at 80 columns

LONG = ["async lat=0ms", "ssp:4 lat=uniform:5ms,20ms strag=0.1:4x comp=topk:0.01",
        "sync n=256 lat=lognormal:10ms,0.5 bw=100Mbps loss=1% comp=qsgd:4 reply=topk:0.05"]


def rendered(table, width: int) -> str:
    from rich.console import Console

    console = Console(width=width, record=True, file=open("/dev/null", "w"))
    console.print(table)
    return console.export_text()


@pytest.mark.parametrize("width", [40, 80, 200])
def test_results_tables_never_cut_arm_names(width):
    from zsgd.experiments.report import SHORT_COLUMNS, results_table as experiment_table
    from zsgd.output.live import ResultsTable

    heads = ["arm", "acc", "t→target s", "upd/s", "sent", "recv", "stale", "p50", "p99", "max"]
    rows = [[name, "81.65%", "not reached", "19,570", "3.53 GB", "3.53 GB", "6.99", "7", "7", "7"] for name in LONG]
    exp_rows = [{"arm": name, "final_acc": 0.8, "time_to_target_s": 1.5, "updates": 300, "time_s": 2.0, "bytes_total": 10**9} for name in LONG]
    exp_rows[-1] |= {"final_acc": 0.1, "diverged": True}
    for table, n_heads in ((ResultsTable("sim", heads, rows), len(heads)), (experiment_table(exp_rows, "experiment"), len(SHORT_COLUMNS))):
        text = rendered(table, width)
        assert max(len(ln) for ln in text.splitlines()) <= width and "…" not in text
        words = " ".join(text.split())
        for name in LONG:
            assert all(w in words for w in name.split()), (name, text)  # whole, maybe wrapped at its spaces
        if width >= 200:
            assert "not shown" not in text and all(name in text for name in LONG)
        else:
            assert "not shown at this width" in text and "results.md" in text
        if width == 80:
            assert "81.65%" in text or "80.00%" in text  # the first results stay beside the names
    if width >= 80:
        assert "diverged" in text  # the experiment's last arm is marked beside its name


@pytest.mark.slow  # a whole simulated sweep: several seconds
def test_sweep_table_at_80_columns_names_every_arm(tmp_path):
    """The real terminal path: COLUMNS=80, a grid with long arm names."""
    import os

    out = tmp_path / "w"
    proc = run_zsgd("sim", "--workers", "4", "--algo", "async,ssp:2", "--latency", "0,uniform:5ms,20ms", "--stragglers", "none,0.25:4x",
                    "--out", str(out), *SMALL, env=os.environ | {"COLUMNS": "80"})
    assert proc.returncode == 0, proc.stderr
    table = proc.stderr[proc.stderr.index("simulated arms"):]
    arms = [row["arm"] for row in csv.DictReader(open(out / "results.csv"))]
    assert len(arms) == 8 and all(f"│ {arm} " in table for arm in arms), table
    assert max(len(ln) for ln in table.splitlines()) <= 80
    md = (out / "results.md").read_text()
    assert all(f"| {arm} |" in md for arm in arms) and "| max |" in md
