"""The single-process trainer and its equivalence with a one-worker sync run."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml

from helpers import cli, read_events, run_zsgd

SMALL = ["--model", "logreg", "--data", "embedded", "--batch-size", "64", "--lr", "0.02", "--seed", "3"]


def test_train_writes_a_complete_run_directory(tmp_path):
    out = tmp_path / "t"
    r = cli("train", *SMALL, "--steps", "120", "--eval-every", "40", "--out", str(out), "--quiet")
    assert r.exit_code == 0, r.output
    assert "embedded" in r.stderr  # says which data set it used
    files = {p.name for p in out.iterdir()}
    assert {"config.yaml", "metrics.jsonl", "summary.json", "weights.npz", "curves_vs_time.png", "curves_vs_updates.png"} <= files
    s = json.loads((out / "summary.json").read_text())
    for key in ("test_accuracy", "test_loss", "updates", "samples", "wall_s"):
        assert key in s
    assert s["updates"] == 120 and s["samples"] == 120 * 64 and s["test_accuracy"] > 0.65
    evals = [e for e in read_events(out) if e["event"] == "eval"]
    assert [e["updates"] for e in evals][:3] == [40, 80, 120]
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["data"] == "embedded" and cfg["lr"] == 0.02
    with np.load(out / "weights.npz") as z:
        assert set(z.files) == {"fc.weight", "fc.bias"} or len(z.files) == 2


@pytest.mark.slow
@pytest.mark.parametrize("schedule", ["constant", "cosine"])
def test_one_worker_sync_run_reproduces_the_trainer(tmp_path, schedule, no_orphans):
    a, b = tmp_path / "train", tmp_path / "run"
    common = [*SMALL, "--steps", "60", "--lr-schedule", schedule, "--quiet"]
    assert cli("train", *common, "--out", str(a)).exit_code == 0  # the trainer is one process: this one
    proc = run_zsgd("run", "--n-proc", "1", "--algo", "sync", *common, "--out", str(b), "--heartbeat", "0.5", "--timeout", "3",
                    "--no-plots")
    assert proc.returncode == 0, proc.stderr
    with np.load(a / "weights.npz") as wa, np.load(b / "weights.npz") as wb:
        for k in wa.files:
            np.testing.assert_array_equal(wa[k], wb[k])  # bit-identical, not just close
    sa, sb = (json.loads((d / "summary.json").read_text()) for d in (a, b))
    assert sa["test_accuracy"] == sb["test_accuracy"] and sa["updates"] == sb["updates"] == 60


def test_yaml_config_with_flag_override(tmp_path):
    conf = tmp_path / "c.yaml"
    conf.write_text("model: logreg\ndata: embedded\nsteps: 10\nlr: 0.01\n")
    out = tmp_path / "t"
    r = cli("train", "--config", str(conf), "--lr", "0.03", "--out", str(out), "--quiet")
    assert r.exit_code == 0, r.output
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["lr"] == 0.03 and cfg["steps"] == 10


@pytest.mark.parametrize("args,needle", [
    (["--model", "resnet900"], "resnet900"),
    (["--data", "cifar-1000"], "cifar-1000"),
    (["--lr", "-0.1"], "--lr"),
    (["--batch-size", "0"], "--batch-size"),
    (["--epochs", "0"], "--epochs"),
    (["--optimizer", "sgdd"], "sgdd"),
    (["--model", "nosuchpkg.mod:factory"], "nosuchpkg"),
])
def test_bad_input_is_one_line_exit_2(tmp_path, args, needle):
    r = cli("train", *SMALL, "--steps", "1", "--out", str(tmp_path / "t"), *args)
    assert r.exit_code == 2, r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0] and "Traceback" not in r.stderr


def test_unwritable_output_directory(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    r = cli("train", *SMALL, "--steps", "1", "--out", str(blocker / "sub"))
    assert r.exit_code == 2 and "cannot write to output directory" in r.stderr


def test_bad_yaml_names_file_and_line(tmp_path):
    conf = tmp_path / "bad.yaml"
    conf.write_text("model: logreg\n  steps: [\n")
    r = cli("train", "--config", str(conf))
    assert r.exit_code == 2 and "bad.yaml:" in r.stderr
    conf.write_text("modle: logreg\n")
    r = cli("train", "--config", str(conf))
    assert r.exit_code == 2 and "modle" in r.stderr


def test_version_and_help():
    assert cli("--version").stdout.strip().startswith("zsgd")
    out = cli("--help").stdout
    for cmd in ("train", "run", "broker", "worker", "data", "plot"):
        assert cmd in out
