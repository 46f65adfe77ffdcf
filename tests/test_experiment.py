"""``zsgd experiment``: a small file produces every output, arms share weights and
shards, and bad files exit 2 with one line naming the file, line and key."""

from __future__ import annotations

import csv
import hashlib
import json
import textwrap
from pathlib import Path

import numpy as np
import pytest

from helpers import cli

SMALL = """\
name: tiny
problem:
  model: logreg
  data: embedded
  split: classes:3
  seed: 7
  batch_size: 16
  lr: 0.05
  optimizer: sgd
  steps: 16
  eval_every: 8
  log_every: 4
target: 0.3
defaults:
  workers: 4
  compute: 2ms
  latency: 1ms
  topology: ring
arms:
  - name: async
    algo: async
  - name: sync-a
    algo: sync
  - name: sync-b
    algo: sync
  - name: dsgd
    algo: dsgd
    mu: 0.01
  - name: cadmm
    algo: cadmm
    rho: 0.1
    primal_steps: 2
    lr: 0.02
"""


def write(tmp_path: Path, text: str, name: str = "exp.yaml") -> Path:
    p = tmp_path / name
    p.write_text(textwrap.dedent(text))
    return p


def invoke(*args: str):
    return cli("experiment", *args, catch_exceptions=False)


@pytest.fixture(scope="module")
def small_run(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("exp")
    out = tmp / "out"
    r = invoke(str(write(tmp, SMALL)), "--out", str(out), "-q")
    assert r.exit_code == 0, r.output + r.stderr
    assert r.stdout.strip() == str(out)
    return out


def test_a_small_experiment_writes_every_file(small_run):
    out = small_run
    assert (out / "experiment.yaml").read_text() == SMALL
    for f in ("results.md", "results.csv", "curves_vs_time.png", "curves_vs_updates.png", "curves_vs_bytes.png"):
        assert (out / f).stat().st_size > 0, f
    arms = sorted(p.name for p in out.iterdir() if p.is_dir())
    assert arms == ["00-async", "01-sync-a", "02-sync-b", "03-dsgd", "04-cadmm"]
    for a in arms:
        assert {"arm.json", "config.yaml", "metrics.jsonl", "summary.json", "weights.npz"} <= {p.name for p in (out / a).iterdir()}
        assert json.loads((out / a / "summary.json").read_text())["updates"] == 16
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["arm"] for r in rows] == ["async", "sync-a", "sync-b", "dsgd", "cadmm"]
    assert {"final_acc", "time_to_target_s", "updates", "bytes_total", "time_s", "consensus_error"} <= set(rows[0])
    assert all(int(r["bytes_total"]) > 0 for r in rows)
    assert rows[3]["consensus_error"] != "" and rows[0]["consensus_error"] == ""
    md = (out / "results.md").read_text()
    assert "| cadmm | sim | cadmm | 4 |" in md and "zsgd experiment" in md


def test_every_arm_starts_from_the_same_weights_on_the_same_shards(small_run):
    from zsgd.data import load_dataset, make_shards
    from zsgd.nn.models import get_model

    ids = [json.loads(p.read_text()) for p in sorted(small_run.glob("*/arm.json"))]
    assert len({i["w0_sha256"] for i in ids}) == 1 and len({tuple(i["shards_sha256"]) for i in ids}) == 1
    # ... and they are the hashes of what the runtime's workers would build from the same seed and split.
    ds = load_dataset("embedded")
    w0 = get_model("logreg", ds.input_shape, ds.n_classes, seed=7).init(seed=7)
    assert ids[0]["w0_sha256"] == hashlib.sha256(np.ascontiguousarray(w0, np.float32).tobytes()).hexdigest()
    shards = make_shards(ds.y_train, "classes:3", 7, 4)
    assert ids[0]["shards_sha256"] == [hashlib.sha256(s.tobytes()).hexdigest() for s in shards]
    # Two arms with the same settings are the same run, event for event (same weights, shards, batches).
    a, b = (small_run / d / "metrics.jsonl" for d in ("01-sync-a", "02-sync-b"))
    assert a.read_bytes() == b.read_bytes()
    cadmm = json.loads((small_run / "04-cadmm" / "arm.json").read_text())
    assert cadmm["config"]["lr"] == 0.02 and cadmm["settings"]["primal_steps"] == 2  # a per-arm override


def test_only_and_check(tmp_path):
    cfg = write(tmp_path, SMALL)
    r = invoke(str(cfg), "--check")
    assert r.exit_code == 0 and "5 arm(s) OK" in r.stdout and not (tmp_path / "runs").exists()
    r = invoke(str(cfg), "--only", "dsgd", "--out", str(tmp_path / "o"), "-q")
    assert r.exit_code == 0, r.stderr
    assert sorted(p.name for p in (tmp_path / "o").iterdir() if p.is_dir()) == ["03-dsgd"]
    r = invoke(str(cfg), "--only", "nope", "--out", str(tmp_path / "o2"))
    assert r.exit_code == 2 and "no arm named 'nope'" in r.stderr


def bad(tmp_path: Path, text: str) -> str:
    cfg = write(tmp_path, text)
    r = invoke(str(cfg), "--out", str(tmp_path / "never"))
    assert r.exit_code == 2, r.output
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("zsgd: error:"), r.stderr
    assert not (tmp_path / "never").exists()  # nothing ran
    return lines[0]


ARMS = "arms:\n  - name: a\n    algo: sync\n"


@pytest.mark.parametrize("text, words", [
    ("problem: {model: logreg}\narmz: []\n", [":2:", "top level", "'armz'", "did you mean 'arms'"]),
    ("problem:\n  model: logreg\n  lrr: 0.1\n" + ARMS, [":3:", "problem", "'lrr'", "'lr'"]),
    ("problem:\n  lr: -1\n" + ARMS, [":2:", "lr"]),
    ("problem: {}\narms:\n  - name: d\n    algo: dsgd\n    rhoo: 0.1\n", [":5:", "arms[0] 'd'", "'rhoo'", "did you mean 'rho'"]),
    ("problem: {}\narms:\n  - name: d\n    algo: dsgd\n    rho: 0.1\n", [":5:", "'rho'", "cadmm parameter"]),
    ("problem: {}\narms:\n  - name: a\n    algo: async\n    topology: ring\n", [":5:", "'topology'", "decentralized"]),
    ("problem: {}\narms:\n  - name: a\n    latency: 10\n", [":4:", "'latency'", "unit"]),
    ("problem: {}\narms:\n  - name: a\n    algo: ssp:x\n", [":4:", "'algo'", "ssp"]),
    ("problem: {}\narms:\n  - name: a\n    workers: 0\n", [":4:", "'workers'", ">= 1"]),
    ("problem: {}\narms:\n  - name: a\n    compress: topk:2\n", [":4:", "'compress'"]),
    ("problem: {}\narms:\n  - name: a\n    servers: 0\n", [":4:", "'servers'", ">= 1"]),
    ("problem: {}\narms:\n  - name: a\n    broker_bandwidth: fast\n", [":4:", "'broker_bandwidth'", "fast"]),
    ("problem: {}\narms:\n  - name: d\n    algo: dsgd\n    servers: 2\n", [":5:", "'servers'"]),
    ("problem: {}\narms:\n  - name: a\n    seed: 3\n", [":4:", "'seed'", "problem:"]),
    ("problem: {}\narms:\n  - name: a\n    mode: run\n    compute: 5ms\n", [":5:", "'compute'", "sim arms only"]),
    ("problem: {}\narms:\n  - name: d\n    algo: dsgd\n    mode: run\n    topology: moebius\n", [":6:", "unknown topology"]),
    ("problem: {}\narms:\n  - name: d\n    algo: dsgd\n    workers: 5\n    topology: random-regular:3\n", [":6:", "n*D even"]),
    ("problem: {}\narms:\n  - name: d\n    algo: dsgd\n    topology: moebius\n", [":5:", "unknown topology"]),
    ("problem: {}\narms:\n  - name: a\n    latency: 0,10ms\n", ["one value per key"]),
    ("problem: {}\narms:\n  - name: a\n  - name: a\n", [":4:", "duplicate arm name"]),
    ("problem: {}\narms:\n  - algo: sync\n", [":3:", "needs a name"]),
    ("problem: {}\narms: []\n", [":2:", "non-empty list"]),
    ("problem: {}\ntarget: 2\n" + ARMS, [":2:", "target"]),
    ("problem: {}\ndefaults:\n  split: iid\n" + ARMS, [":3:", "'split'", "problem:"]),
    ("problem: {}\nproblem: {}\n" + ARMS, [":2:", "duplicate key 'problem'"]),
    ("problem: {model: [logreg\n" + ARMS, ["invalid YAML"]),
    ("problem:\n  model: logreg\n   lr: 1\n", [":3:", "invalid YAML"]),
    ("- just\n- a list\n", ["mapping"]),
])
def test_bad_files_exit_2_with_one_line_naming_line_and_key(tmp_path, text, words):
    line = bad(tmp_path, text)
    assert "exp.yaml" in line
    for w in words:
        assert w in line, (w, line)


def test_missing_and_unreadable_files(tmp_path):
    r = invoke(str(tmp_path / "nope.yaml"))
    assert r.exit_code == 2 and "cannot read experiment file" in r.stderr
    (tmp_path / "bin.yaml").write_bytes(b"\xff\xfe\x00bad")
    r = invoke(str(tmp_path / "bin.yaml"))
    assert r.exit_code == 2 and len(r.stderr.strip().splitlines()) == 1


def test_an_arm_that_cannot_be_served_fails_before_any_arm_runs(tmp_path):
    text = "problem: {model: logreg, data: embedded, split: 'classes:11', steps: 2}\n" + ARMS
    line = bad(tmp_path, text)
    assert "arm 'a'" in line and "classes" in line


@pytest.mark.parametrize("path", sorted(Path(__file__).resolve().parents[1].glob("examples/*.yaml")))
def test_the_examples_are_valid(path):
    r = invoke(str(path), "--check")
    assert r.exit_code == 0, r.stderr


@pytest.mark.slow
def test_a_run_arm_uses_real_processes_with_the_same_weights_and_shards(tmp_path, no_orphans):
    text = """\
    name: both
    problem: {model: logreg, data: embedded, steps: 6, eval_every: 3, batch_size: 16, optimizer: sgd, lr: 0.05}
    defaults: {workers: 2}
    arms:
      - {name: sim, algo: sync, compute: 2ms}
      - {name: real, algo: sync, mode: run, heartbeat: 0.5, timeout: 3}
    """
    out = tmp_path / "out"
    r = invoke(str(write(tmp_path, text)), "--out", str(out), "-q")
    assert r.exit_code == 0, r.stderr
    real = json.loads((out / "01-real" / "summary.json").read_text())
    assert real["mode"] == "run" and real["updates"] == 6
    ids = [json.loads((out / d / "arm.json").read_text()) for d in ("00-sim", "01-real")]
    assert ids[0]["w0_sha256"] == ids[1]["w0_sha256"] and ids[0]["shards_sha256"] == ids[1]["shards_sha256"]
    with open(out / "results.csv") as f:
        assert [row["mode"] for row in csv.DictReader(f)] == ["sim", "run"]
