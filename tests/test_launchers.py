"""Launchers have one shape: a new one is a class and one registration line, and the run loop never asks which it has.

The toy launcher here starts each worker as a fresh interpreter with ``subprocess`` (no fork, no SSH, no Slurm),
hands it the run's keys on stdin as every launcher must, and is registered under its own name; a real run then
trains with the workers it started, and stops them at its end.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from zsgd.runtime.launch.base import LAUNCHERS, LOCAL, LaunchContext, Rank, failed_child, plan_ranks, register_launcher


class ToyLauncher:
    """Every worker of the run as ``python -m zsgd worker``, started with subprocess and stopped with SIGTERM."""

    name = "toy"

    def __init__(self, ctx: LaunchContext) -> None:
        self.ctx = ctx
        self.children: list = []
        self.started: list[Rank] = []

    def start(self, ranks: list[Rank]) -> None:
        from zsgd.runtime.launch.local import Child, send_line

        for rank in ranks:
            log = self.ctx.run_dir / "logs" / f"toy-{rank.role}-{rank.id}.log"
            log.parent.mkdir(parents=True, exist_ok=True)
            with open(log, "ab") as out:
                proc = subprocess.Popen([sys.executable, "-m", "zsgd", "worker", "--connect", self.ctx.access.local_address(self.ctx.broker.address),
                                         "--id", str(rank.id), "--role", rank.role, "--keys-stdin", "--heartbeat", "0.2", "--timeout", "1.5"],
                                        stdin=subprocess.PIPE, stdout=out, stderr=subprocess.STDOUT)
            send_line(proc, self.ctx.access.keys.bundle(f"{rank.role}-{rank.id}"))
            self.children.append(Child(f"{rank.role}-{rank.id}", proc, log))
            self.started.append(rank)

    def running(self) -> list:
        return [c for c in self.children if c.returncode is None]

    def lost(self) -> str | None:
        return None

    def failed(self) -> str | None:
        return failed_child(self.children)

    def stop_all(self, grace: float = 5.0) -> None:
        for c in self.children:
            try:
                c.proc.wait(timeout=grace + 10)
            except subprocess.TimeoutExpired:
                c.proc.kill()
                c.proc.wait(timeout=10)


def test_plan_ranks_names_a_launcher_for_every_process():
    ranks = plan_ranks(2, 3, servers=3, remote_servers={2}, evaluator=True, workers_by=LOCAL)
    assert ranks == [Rank("server", 1, LOCAL), Rank("server", 2, "ssh"), Rank("worker", 0, LOCAL), Rank("worker", 1, LOCAL),
                     Rank("worker", 2, "ssh"), Rank("worker", 3, "ssh"), Rank("worker", 4, "ssh"), Rank("evaluator", 0, LOCAL)]
    assert [r.launcher for r in plan_ranks(4, 0, 1, set(), False, "slurm")] == ["slurm"] * 4


@pytest.mark.slow
def test_a_new_launcher_is_one_class_and_one_registration_line(tmp_path, no_orphans):
    from zsgd.core.config import TrainConfig
    from zsgd.runtime.run_options import RunOptions
    from zsgd.runtime.runner import run_distributed

    made: list[ToyLauncher] = []
    register_launcher("toy", lambda ctx: made.append(ToyLauncher(ctx)) or made[-1])  # the registration line
    cfg = TrainConfig(model="logreg", data="embedded", steps=300, batch_size=32, lr=0.05, name="toy").validate()
    opts = RunOptions.from_flags({"n_proc": 2, "launcher": "toy", "heartbeat": 0.2, "timeout": 1.5, "show": False, "plots": False})
    try:
        summary = run_distributed(cfg, opts.validate(), out=str(tmp_path / "run"))
    finally:
        LAUNCHERS.pop("toy")
    assert summary["updates"] == 300 and summary["test_accuracy"] > 0.6
    assert [launcher.started for launcher in made] == [[Rank("worker", 0, "toy"), Rank("worker", 1, "toy")]]
    assert all(c.returncode == 0 for c in made[0].children)  # told to leave by the broker, and gone
    assert (tmp_path / "run" / "logs" / "evaluator-0.log").exists()  # the evaluator is still the local launcher's
