"""``zsgd worker``: one worker (or evaluator) process joining a broker."""

from __future__ import annotations

import os
import sys

import click

from zsgd.errors import ZsgdError
from zsgd.runtime.launch.ranks import MAX_WORKER_ID


@click.command()
@click.option("--connect", required=True, help="Broker address, e.g. tcp://127.0.0.1:5555.")
@click.option("--id", "worker_id", type=click.IntRange(0, MAX_WORKER_ID), default=None,
              help="Worker id (stable across restarts); default: the launcher's rank (OMPI_COMM_WORLD_RANK, PMI_RANK, SLURM_PROCID), "
                   "else the broker picks.")
@click.option("--role", type=click.Choice(["worker", "evaluator", "server"]), default="worker", show_default=True,
              help="server: a range server of a --servers K run (started by 'zsgd run' with --id 1..K-1).")
@click.option("--data-dir", type=click.Path(file_okay=False), default=None, help="Local copy of the data set (else the broker sends the shard).")
@click.option("--heartbeat", default=1.0, show_default=True, type=float)
@click.option("--timeout", default=3.0, show_default=True, type=float, help="Exit when the broker is silent this long.")
@click.option("--join-timeout", default=60.0, show_default=True, type=float, help="Give up if no broker answers within this time.")
@click.option("--quiet", "-q", is_flag=True)
@click.option("--keys-stdin", is_flag=True, help="Read CURVE keys or the run secret as one JSON line from stdin (how 'zsgd run' hands them over).")
@click.option("--keys-file", type=click.Path(), default=None,
              help="Keys file (mode 0600): CURVE keys, e.g. from 'zsgd keys generate', or a run's secret (RUN_DIR/keys/run.json); "
                   "or that folder, to take client-(ID+1).json (one key per worker of an mpirun/srun launch), else its run.json.")
@click.option("--model", "started_for", default=None, metavar="SPEC",
              help="The user model (package.module:factory) this worker may run: a broker asking for any other user model "
                   "is refused. Built-in models need no flag.")
@click.option("--watch-stdin", is_flag=True, help="Exit when stdin closes (ties a remote worker to its SSH session).")
@click.option("--host-label", default=None, help="Name of this machine in the broker's view (default: hostname).")
@click.option("--advertise", default=None, hidden=True, help="A range server's address on this host (set by 'zsgd run --remote').")
@click.option("--tag", default=None, hidden=True, help="Marker in the command line, so 'zsgd run' can find its processes.")
@click.option("--shared-memory/--no-shared-memory", default=None,
              help="With a broker on this machine, move gradients and weights through /dev/shm instead of TCP "
                   "[default: on, unless ZSGD_SHARED_MEMORY=0].")
def worker(connect: str, worker_id: int | None, role: str, data_dir: str | None, heartbeat: float, timeout: float, join_timeout: float, quiet: bool,
           keys_stdin: bool, keys_file: str | None, watch_stdin: bool, host_label: str | None, advertise: str | None, tag: str | None,
           shared_memory: bool | None, started_for: str | None) -> None:
    """Join a broker and compute gradients until it says stop."""
    from zsgd.core.config import check_seconds
    from zsgd.runtime.worker.node_options import MAX_JOIN_TIMEOUT, check_liveness
    from zsgd.wire.link import check_endpoint

    check_endpoint(connect)
    check_liveness(heartbeat, timeout)
    check_seconds("--join-timeout", join_timeout, MAX_JOIN_TIMEOUT, positive=True)
    from zsgd.runtime.threads import single_threaded_blas

    single_threaded_blas()
    from zsgd.node import NodeOptions, run_node

    if role == "server" and (worker_id is None or worker_id < 1):
        raise ZsgdError("--role server needs --id I >= 1 (its range of the model; range 0 is the coordinator's)")
    if worker_id is None and role == "worker":
        from zsgd.runtime.launch.ranks import rank_from_env

        found = rank_from_env()  # srun, mpirun or a PMI launcher numbered this process
        worker_id = None if found is None else found[0]
    creds = None
    if keys_stdin and keys_file:
        raise ZsgdError("give --keys-stdin or --keys-file, not both")
    if keys_stdin or keys_file:
        from zsgd.wire.security import RUN_SECRET_FILE, credentials, read_keys_line, read_secret_json

        if keys_file and os.path.isdir(keys_file):
            folder = keys_file
            keys_file = os.path.join(folder, f"client-{worker_id + 1}.json") if worker_id is not None else None
            if keys_file is None or not os.path.isfile(keys_file):
                keys_file = os.path.join(folder, RUN_SECRET_FILE)
            if not os.path.isfile(keys_file):
                if worker_id is None:
                    raise ZsgdError(f"--keys-file {folder} is a folder: give --id (or start under a launcher that sets a rank) "
                                    "so the worker knows which client key is its own")
                raise ZsgdError(f"--keys-file: no client-{worker_id + 1}.json or {RUN_SECRET_FILE} in {folder} for worker {worker_id} "
                                "(make more with 'zsgd keys generate --clients N')")
        creds = read_keys_line(rank=worker_id) if keys_stdin else credentials(read_secret_json(keys_file))
    if watch_stdin:
        from zsgd.remote.launcher import exit_when_stdin_closes

        exit_when_stdin_closes()
    if host_label is None:
        host_label = os.environ.get("SLURMD_NODENAME")  # in a Slurm step: the node's name in the cluster (may differ from hostname)
    code = run_node(NodeOptions(connect=connect, worker_id=worker_id, role=role, heartbeat=heartbeat, timeout=timeout,
                                join_timeout=join_timeout, data_dir=data_dir, quiet=quiet, curve=creds.curve if creds else None,
                                token=creds.token if creds else None, model=started_for, host_label=host_label,
                                advertise=advertise, **({} if shared_memory is None else {"shared_memory": shared_memory})))
    sys.exit(code)
