"""A PyTorch model (``--model torch:examples.torch.resnet:make``) everywhere a model name goes: real runs
(forked and exec'd workers, a sharded server, compression), the simulator and an experiment.

Real processes on loopback, small budgets on the embedded subset; each test checks that the run trained
the torch model (its parameter count, an accuracy above chance), not just that it exited 0.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys

import pytest

from helpers import REPO, summary_of

pytest.importorskip("torch")
pytestmark = [pytest.mark.slow, pytest.mark.torch]

RESNET = "torch:examples.torch.resnet:make"
N_PARAMS = 5122  # examples/torch/resnet.py: parameters only, BatchNorm's running statistics stay local
CHANCE = 0.1


def zsgd(*args: str, env: dict[str, str] | None = None, python_flags: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """``python [FLAGS] -m zsgd ARGS`` from the repository root, where ``examples.torch.resnet`` is."""
    proc = subprocess.run([sys.executable, *python_flags, "-m", "zsgd", *map(str, args)], capture_output=True, text=True,
                          timeout=400, cwd=REPO, stdin=subprocess.DEVNULL, env=os.environ | (env or {}))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture(autouse=True)
def home(fresh_home):
    """Each test's own ZSGD_HOME (see conftest's ``fresh_home``)."""


def test_run_with_four_forked_workers(tmp_path, no_orphans):
    # -P: the current directory is not on sys.path (as under the installed ``zsgd`` script); zsgd adds it for the spec
    zsgd("run", "--n-proc", "4", "--model", RESNET, "--data", "embedded", "--steps", "300", "--quiet", "--no-plots", "--out", tmp_path / "r",
         python_flags=("-P",))
    s = summary_of(tmp_path / "r")
    assert s["n_params"] == N_PARAMS and s["updates"] >= 300
    assert s["test_accuracy"] > CHANCE + 0.15  # the broker evaluates with batch statistics: it never trained
    assert (tmp_path / "r" / "weights.npz").exists()
    import numpy as np

    names = set(np.load(tmp_path / "r" / "weights.npz").files)
    assert {"stem.weight", "fc.bias", "bn.running_mean"} <= names  # the module's own names


def test_run_exec_workers_sharded_and_compressed(tmp_path, no_orphans):
    # one run for the three (each was a run of its own, each paying torch's import in every process): exec'd workers
    # (no parent to fork from), two range servers, top-k updates; async torch runs are test_run_with_four_forked_workers'
    zsgd("run", "--n-proc", "2", "--model", RESNET, "--data", "embedded", "--steps", "150", "--servers", "2", "--algo", "sync",
         "--compress", "topk:0.1", "--quiet", "--no-plots", "--out", tmp_path / "sharded", env={"ZSGD_LOCAL_START": "exec"})
    s = summary_of(tmp_path / "sharded")
    assert s["n_params"] == N_PARAMS and s["test_accuracy"] > CHANCE + 0.1
    assert s["servers"] == 2 and [hi - lo for lo, hi in s["server_ranges"]] == [N_PARAMS // 2, N_PARAMS - N_PARAMS // 2]
    assert s["compression_ratio"] > 2  # top-k: a tenth of the values, with their indices


def test_sim_delay_arms_are_reproducible(tmp_path, no_orphans):
    results = []
    for out in ("s1", "s2"):  # two evaluations an arm, not ten: the metrics compared do not depend on how often it evaluates
        zsgd("sim", "--model", RESNET, "--data", "embedded", "--workers", "4", "--latency", "0,100ms", "--steps", "150",
             "--eval-every", "75", "--quiet", "--out", tmp_path / out)
        results.append(list(csv.DictReader(open(tmp_path / out / "results.csv"))))
    rows = results[0]
    assert len(rows) == 2
    for row in rows:
        assert float(row["final_acc"]) > CHANCE + 0.1, row
        assert summary_of(tmp_path / "s1" / row["dir"])["n_params"] == N_PARAMS
    # same command and seed, same metrics: torch's steps are seeded and single-threaded like the kernels
    keys = ("final_acc", "updates", "staleness_mean", "bytes_sent")
    assert [[r[k] for k in keys] for r in rows] == [[r[k] for k in keys] for r in results[1]]


def test_a_run_without_a_torch_model_never_imports_torch(tmp_path, no_orphans):
    code = f"""
import sys
from zsgd.cli import main
try:
    main(["run", "--n-proc", "2", "--model", "logreg", "--data", "embedded", "--steps", "20", "--quiet", "--out", {str(tmp_path / "r")!r}])
except SystemExit as exc:
    assert not exc.code, exc.code
print("torch" in sys.modules)
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=REPO,
                          stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "False"
    assert summary_of(tmp_path / "r")["updates"] >= 20


def test_experiment_sim_and_run_arms(tmp_path, no_orphans):
    (tmp_path / "e.yaml").write_text(f"""
name: torch-small
problem:
  model: {RESNET}
  data: embedded
  batch_size: 32
  lr: 0.05
  steps: 100
arms:
  - name: sim-async
    mode: sim
    algo: async
    workers: 2
    latency: 10ms
  - name: run-async
    mode: run
    algo: async
    workers: 2
""")
    zsgd("experiment", tmp_path / "e.yaml", "--quiet", "--jobs", "1", "--out", tmp_path / "x")
    rows = {r["arm"]: r for r in csv.DictReader(open(tmp_path / "x" / "results.csv"))}
    assert set(rows) == {"sim-async", "run-async"}
    for row in rows.values():
        assert float(row["final_acc"]) > CHANCE + 0.1, row
