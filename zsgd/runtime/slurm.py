"""Running inside a Slurm allocation: what it holds, and job steps that start there.

zsgd does not talk to slurmctld itself: it reads the allocation from the
environment Slurm gives every job (``SLURM_JOB_ID``, ``SLURM_JOB_NODELIST``,
``SLURM_JOB_CPUS_PER_NODE``, ...) and starts work with the user's own
``srun``, so site settings (partitions, accounts, ``--mpi``, prolog) apply
unchanged, and anything started is a job step that ``scancel``, the time
limit and ``squeue --steps`` know about.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
from dataclasses import dataclass
from typing import Mapping

from zsgd.errors import ZsgdError


@dataclass
class Allocation:
    """The Slurm job this process runs in."""

    job_id: str
    nodes: list[str]
    cpus_per_node: list[int]  # same order as ``nodes``
    batch_host: str  # the node this process (the broker, the sweep's parent) runs on
    mem_per_cpu_mb: int | None = None

    @property
    def cpus(self) -> int:
        return sum(self.cpus_per_node)

    def step_argv(self, ntasks: int, job_name: str, cpus_per_task: int = 1, extra: tuple[str, ...] = ()) -> list[str]:
        """``srun`` for a step of ``ntasks`` one-CPU tasks that shares the allocation with other steps.

        ``--exact`` gives the step only the CPUs it asks for (so several steps
        run side by side); ``--mem-per-cpu`` keeps a step from claiming all of
        the job's memory, which on clusters that schedule memory would make
        every other step wait; ``--kill-on-bad-exit`` ends the step when one
        task fails, as a dead worker or arm should."""
        argv = [srun_path(), f"--job-name={job_name}", f"--ntasks={ntasks}", f"--cpus-per-task={cpus_per_task}", "--exact",
                "--kill-on-bad-exit=1", "--quiet"]
        if self.mem_per_cpu_mb:
            argv.append(f"--mem-per-cpu={self.mem_per_cpu_mb}")
        return argv + list(extra)


def in_allocation(environ: Mapping[str, str] | None = None) -> bool:
    return bool((os.environ if environ is None else environ).get("SLURM_JOB_ID"))


def srun_path() -> str:
    path = shutil.which("srun")
    if path is None:
        raise ZsgdError("--launcher slurm: 'srun' is not on PATH (load the site's Slurm module, or run on a node of the cluster)")
    return path


def parse_cpus_per_node(text: str) -> list[int]:
    """``SLURM_JOB_CPUS_PER_NODE``, e.g. ``"4"``, ``"72(x2),36"`` -> ``[4]``, ``[72, 72, 36]``."""
    out: list[int] = []
    for part in text.split(","):
        m = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", part)
        if not m:
            raise ZsgdError(f"SLURM_JOB_CPUS_PER_NODE={text!r}: not the form Slurm writes (e.g. 4 or 72(x2),36)")
        out += [int(m.group(1))] * int(m.group(2) or 1)
    return out


def expand_nodelist(text: str) -> list[str]:
    """A compressed host list (``node[01-03,07]``) as names, through ``scontrol show hostnames`` (Slurm's own parser)."""
    if not any(c in text for c in "[],"):
        return [text]
    scontrol = shutil.which("scontrol")
    if scontrol is None:
        raise ZsgdError(f"cannot expand the node list {text!r}: 'scontrol' is not on PATH")
    out = subprocess.run([scontrol, "show", "hostnames", text], capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
    if out.returncode != 0:
        raise ZsgdError(f"scontrol show hostnames {text}: {out.stderr.strip() or f'exit {out.returncode}'}")
    return out.stdout.split()


def current_allocation(environ: Mapping[str, str] | None = None, flag: str = "--launcher slurm") -> Allocation:
    """The allocation of this process; a ``ZsgdError`` outside one."""
    env = os.environ if environ is None else environ
    job = env.get("SLURM_JOB_ID")
    if not job:
        raise ZsgdError(f"{flag}: not inside a Slurm allocation (SLURM_JOB_ID is not set); run it under salloc or in an sbatch script")
    nodes = expand_nodelist(env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST") or socket.gethostname())
    cpus = parse_cpus_per_node(env.get("SLURM_JOB_CPUS_PER_NODE") or str(env.get("SLURM_NTASKS") or 1))
    if len(cpus) != len(nodes):
        raise ZsgdError(f"SLURM_JOB_CPUS_PER_NODE lists {len(cpus)} node(s) but the node list has {len(nodes)}")
    mem = None
    if env.get("SLURM_MEM_PER_CPU", "").isdigit():
        mem = int(env["SLURM_MEM_PER_CPU"])
    elif env.get("SLURM_MEM_PER_NODE", "").isdigit() and min(cpus) > 0:
        mem = max(1, int(env["SLURM_MEM_PER_NODE"]) // max(cpus))
    host = env.get("SLURMD_NODENAME") or socket.gethostname().split(".")[0]
    return Allocation(job_id=job, nodes=nodes, cpus_per_node=cpus, batch_host=host, mem_per_cpu_mb=mem)
