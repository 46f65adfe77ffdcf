"""Worker ids from a launcher's rank variables (srun, mpirun, PMI launchers)."""

from __future__ import annotations

import os

import pytest

from helpers import broker_address, cli, lines_of, read_events, reap, start_worker, start_zsgd, stop, summary_of
from zsgd.errors import ZsgdError
from zsgd.runtime.launch.ranks import RANK_VARIABLES, rank_from_env

FAST = ["--model", "logreg", "--data", "embedded", "--batch-size", "32", "--lr", "0.01", "--heartbeat", "0.5", "--timeout", "5", "--quiet", "--no-plots"]  # the PNGs are tested where a test looks at them
NO_RANKS = {name: None for name in RANK_VARIABLES}  # CliRunner's env: None unsets


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
    r = cli("worker", "--connect", "tcp://127.0.0.1:9", env=NO_RANKS | {"OMPI_COMM_WORLD_RANK": "zero"})
    assert r.exit_code == 2
    assert len(lines_of(r.stderr)) == 1 and "OMPI_COMM_WORLD_RANK='zero' is not a rank" in r.stderr


def test_a_keys_folder_without_an_id_is_refused(tmp_path):
    (tmp_path / "keys").mkdir()
    r = cli("worker", "--connect", "tcp://127.0.0.1:9", "--keys-file", str(tmp_path / "keys"), env=NO_RANKS)
    assert r.exit_code == 2 and len(lines_of(r.stderr)) == 1 and "is a folder: give --id" in r.stderr


def _ranked_workers(out, variable: str, *extra: str) -> tuple[int, list[int], str]:
    """A broker for 2 workers and two 'zsgd worker --connect' processes told only their rank (as mpirun -n 2 would)."""
    broker = start_zsgd("broker", "--workers", "2", "--steps", "200", "--out", str(out), *FAST, *extra[:2])
    workers = []
    try:
        address = broker_address(out)
        env = {k: v for k, v in os.environ.items() if k not in RANK_VARIABLES}
        for rank in (1, 0):
            workers.append(start_worker(address, "--heartbeat", "0.5", "--timeout", "5", "--quiet", *extra[2:],
                                        env=env | {variable: str(rank)}, keys=None if extra else out / "keys"))
        _, err = broker.communicate(timeout=120)
        reap(*workers, timeout=30)
    finally:
        stop(broker, *workers)
    return broker.returncode, [w.returncode for w in workers], err


@pytest.mark.slow
@pytest.mark.parametrize("variable", RANK_VARIABLES)
def test_workers_take_their_ids_from_the_launcher(tmp_path, variable, no_orphans):
    code, codes, err = _ranked_workers(tmp_path / "run", variable)
    assert code == 0 and codes == [0, 0], err[-2000:]
    joined = {e["worker"] for e in read_events(tmp_path / "run") if e["event"] == "worker" and e.get("role") == "worker"}
    assert joined == {0, 1}
    s = summary_of(tmp_path / "run")
    assert s["updates"] >= 200 and s["test_accuracy"] > 0.6


@pytest.mark.slow
def test_ranked_workers_take_their_own_key_from_a_keys_folder(tmp_path, no_orphans):
    """mpirun -n 2 zsgd worker --keys-file KEYS: rank r uses KEYS/client-(r+1).json, so no two workers share a key."""
    keys = tmp_path / "keys"
    assert cli("keys", "generate", str(keys), "--clients", "2").exit_code == 0
    code, codes, err = _ranked_workers(tmp_path / "run", "PMI_RANK", "--keys", str(keys), "--keys-file", str(keys))
    assert code == 0 and codes == [0, 0], err[-2000:]
    s = summary_of(tmp_path / "run")
    assert s["updates"] >= 200 and s["refused_clients"] == 0 and s["rejected_messages"] == 0
