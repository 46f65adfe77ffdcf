"""Worker ids from a launcher's rank variables (srun, mpirun, PMI launchers)."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from conftest import read_events, run_zsgd, wait_for, zsgd_cmd
from zsgd.errors import ZsgdError
from zsgd.runtime.ranks import rank_from_env

FAST = ["--model", "logreg", "--data", "embedded", "--batch-size", "32", "--lr", "0.01", "--heartbeat", "0.5", "--timeout", "5", "--quiet"]


def test_rank_order_prefers_the_launcher_closest_to_the_process():
    assert rank_from_env({}) is None
    assert rank_from_env({"SLURM_PROCID": "3"}) == (3, "SLURM_PROCID")
    assert rank_from_env({"PMI_RANK": "5", "SLURM_PROCID": "5"}) == (5, "PMI_RANK")
    # mpirun inside a batch script: every process inherited the batch step's SLURM_PROCID=0
    assert rank_from_env({"OMPI_COMM_WORLD_RANK": "7", "SLURM_PROCID": "0"}) == (7, "OMPI_COMM_WORLD_RANK")


@pytest.mark.parametrize("value", ["", "abc", "-1", "1.5", "0x2"])
def test_a_rank_that_is_not_a_number_is_refused(value):
    with pytest.raises(ZsgdError, match="not a rank"):
        rank_from_env({"PMI_RANK": value})


def test_worker_with_bad_rank_variable_says_so_in_one_line():
    env = os.environ | {"OMPI_COMM_WORLD_RANK": "zero"}
    proc = subprocess.run(zsgd_cmd("worker", "--connect", "tcp://127.0.0.1:9"), capture_output=True, text=True, timeout=60,
                          stdin=subprocess.DEVNULL, env=env)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "OMPI_COMM_WORLD_RANK='zero' is not a rank" in proc.stderr


@pytest.mark.slow
@pytest.mark.parametrize("variable", ["OMPI_COMM_WORLD_RANK", "PMI_RANK", "SLURM_PROCID"])
def test_workers_take_their_ids_from_the_launcher(tmp_path, variable, no_orphans):
    """What mpirun -n 2 zsgd worker --connect ADDR does: two processes, ids from the rank variable."""
    out = tmp_path / "run"
    broker = subprocess.Popen(zsgd_cmd("broker", "--workers", "2", "--steps", "200", "--out", str(out), *FAST),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True, start_new_session=True)
    workers = []
    try:
        address = wait_for(lambda: next((e["address"] for e in read_events(out) if e["event"] == "start"), None), 60, what="broker")
        for rank in (1, 0):
            env = {k: v for k, v in os.environ.items() if k not in ("SLURM_PROCID", "PMI_RANK", "OMPI_COMM_WORLD_RANK")}
            workers.append(subprocess.Popen(zsgd_cmd("worker", "--connect", address, "--heartbeat", "0.5", "--timeout", "5", "--quiet"),
                                            env=env | {variable: str(rank)}, stdin=subprocess.DEVNULL))
        _, err = broker.communicate(timeout=120)
        codes = [w.wait(timeout=30) for w in workers]
    finally:
        if broker.poll() is None:
            broker.kill()
            broker.communicate()
        for w in workers:
            if w.poll() is None:
                w.kill()
                w.wait()
    assert broker.returncode == 0, err[-2000:]
    assert codes == [0, 0]
    joined = {e["worker"] for e in read_events(out) if e["event"] == "worker" and e.get("role") == "worker"}
    assert joined == {0, 1}
    s = json.loads((out / "summary.json").read_text())
    assert s["updates"] >= 200 and s["test_accuracy"] > 0.6


@pytest.mark.slow
def test_ranked_workers_take_their_own_key_from_a_keys_folder(tmp_path, no_orphans):
    """mpirun -n 2 zsgd worker --keys-file KEYS: rank r uses KEYS/client-(r+1).json, so no two workers share a key."""
    keys = tmp_path / "keys"
    assert run_zsgd("keys", "generate", str(keys), "--clients", "2", timeout=60).returncode == 0
    out = tmp_path / "run"
    broker = subprocess.Popen(zsgd_cmd("broker", "--workers", "2", "--keys", str(keys), "--steps", "200", "--out", str(out), *FAST),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True, start_new_session=True)
    workers = []
    try:
        address = wait_for(lambda: next((e["address"] for e in read_events(out) if e["event"] == "start"), None), 60, what="broker")
        for rank in (0, 1):
            workers.append(subprocess.Popen(zsgd_cmd("worker", "--connect", address, "--keys-file", str(keys), "--heartbeat", "0.5",
                                                     "--timeout", "5", "--quiet"),
                                            env=os.environ | {"PMI_RANK": str(rank)}, stdin=subprocess.DEVNULL))
        _, err = broker.communicate(timeout=120)
        codes = [w.wait(timeout=30) for w in workers]
    finally:
        if broker.poll() is None:
            broker.kill()
            broker.communicate()
        for w in workers:
            if w.poll() is None:
                w.kill()
                w.wait()
    assert broker.returncode == 0 and codes == [0, 0], err[-2000:]
    s = json.loads((out / "summary.json").read_text())
    assert s["updates"] >= 200 and s["refused_clients"] == 0 and s["rejected_messages"] == 0


def test_a_keys_folder_without_an_id_is_refused(tmp_path):
    keys = tmp_path / "keys"
    keys.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("SLURM_PROCID", "PMI_RANK", "OMPI_COMM_WORLD_RANK")}
    proc = subprocess.run(zsgd_cmd("worker", "--connect", "tcp://127.0.0.1:9", "--keys-file", str(keys)), capture_output=True, text=True,
                          timeout=60, stdin=subprocess.DEVNULL, env=env)
    assert proc.returncode == 2 and "is a folder: give --id" in proc.stderr and proc.stderr.strip().count("\n") == 0
