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
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from zsgd.errors import ZsgdError
from zsgd.runtime.launch.base import failed_child


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

    def step_argv(self, ntasks: int, job_name: str, cpus_per_task: int = 1, kill_on_bad_exit: bool = True,
                  extra: tuple[str, ...] = ()) -> list[str]:
        """``srun`` for a step of ``ntasks`` one-CPU tasks that shares the allocation with other steps.

        ``--exact`` gives the step only the CPUs it asks for (so several steps
        run side by side); ``--mem-per-cpu`` keeps a step from claiming all of
        the job's memory, which on clusters that schedule memory would make
        every other step wait; ``--kill-on-bad-exit`` ends the step when one
        task fails (said explicitly either way: sites set their own default)."""
        argv = [srun_path(), f"--job-name={job_name}", f"--ntasks={ntasks}", f"--cpus-per-task={cpus_per_task}", "--exact",
                f"--kill-on-bad-exit={int(kill_on_bad_exit)}", "--quiet"]
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


# -- the workers of 'zsgd run --launcher slurm' ------------------------------------------------
#: What srun writes on its stderr when tasks exit with zsgd's error exit code (zsgd.runtime.launch.base.ERROR_EXIT).
SRUN_TASK_ERROR = re.compile(r"srun: error: (\S+): tasks? ([\d,\-]+): Exited with exit code 2\b")
BROKER_CPUS = 1  # the broker (with its evaluator, which runs only at evaluation points) keeps one CPU of the batch host


@dataclass
class SlurmPlan:
    """Where the workers of a run go: one srun step of ``n_workers`` tasks; the addresses they use."""

    allocation: Allocation
    n_workers: int
    advertise: str  # the address workers connect to (on the route from the nodes to the batch host)
    bind_host: str


def plan_workers(requested: int | None, advertise: str | None, host_flag: str | None) -> SlurmPlan:
    """Check the allocation can hold the workers asked for (default: all its CPUs but the broker's) and pick the addresses."""
    alloc = current_allocation()
    srun_path()
    room = alloc.cpus - BROKER_CPUS
    n = room if requested is None else requested
    if n < 1 or n > room:
        asked = f"{n} worker(s) + {BROKER_CPUS} CPU for the broker need {n + BROKER_CPUS} CPUs"
        raise ZsgdError(f"--launcher slurm: the allocation is too small: {asked}, Slurm job {alloc.job_id} has {alloc.cpus} "
                        f"(ask for more with salloc/sbatch -n, or fewer workers with --n-proc)" if n >= 1 else
                        f"--launcher slurm: Slurm job {alloc.job_id} has {alloc.cpus} CPU(s): none left for workers after the broker's "
                        f"{BROKER_CPUS}; ask for at least {BROKER_CPUS + 1} (salloc/sbatch -n {BROKER_CPUS + 1})")
    adv = (advertise or host_flag or route_to(alloc.nodes)).strip("[]")
    bind = host_flag or adv
    return SlurmPlan(alloc, n, adv, bind)


def route_to(nodes: list[str]) -> str:
    """The local address on the route to the allocation's nodes (UDP connect: no packet is sent)."""
    for node in nodes:
        try:
            info = socket.getaddrinfo(node, 6818, type=socket.SOCK_DGRAM)[0]
            with socket.socket(info[0], socket.SOCK_DGRAM) as s:
                s.connect(info[4])
                return s.getsockname()[0]
        except OSError:
            continue
    raise ZsgdError(f"cannot work out which address the nodes ({', '.join(nodes[:3])}) reach this machine on; pass --advertise ADDRESS")


class SlurmLauncher:
    """The workers of a run as one ``srun`` step; the launcher interface of ``LocalLauncher`` (``children``, ``running``, ``stop_all``).

    Keys travel on the step's stdin, never through a file: ``srun --input=all``
    gives every task the same lines, one bundle per rank, and each worker keeps
    the line of its own ``SLURM_PROCID`` (``zsgd.wire.security.read_keys_line``).
    The pipe then stays open: a worker started with ``--watch-stdin`` leaves
    when it closes, which ties the whole step to this process (Ctrl-C, an
    error, even ``kill -9``: srun gets SIGTERM from the parent-death signal).

    Why no ``--kill-on-bad-exit``: a dead task is a dead worker, as with the
    other launchers -- the broker carries on with the rest instead of losing
    the whole step to one failure."""

    def __init__(self, plan: SlurmPlan, address: str, log_dir: Path, heartbeat: float, timeout: float, run_id: str,
                 keys: Any = None, join_timeout: float = 120.0, model: str | None = None) -> None:
        self.plan, self.address, self.log_dir = plan, address, Path(log_dir)
        self.model = model  # a user model's spec: the workers are started for it
        self.heartbeat, self.timeout, self.join_timeout = heartbeat, timeout, join_timeout
        self.keys, self.job_name = keys, f"zsgd-workers-{run_id}"
        self.children: list[Any] = []
        self._scanned = 0  # bytes of the step's log that failed() has read
        self._failure: str | None = None  # what failed() found
        self._said = ""  # the last 'zsgd: error:' line of a task that failed() has read

    def argv(self, n: int) -> list[str]:
        base = self.plan.allocation.step_argv(n, self.job_name, kill_on_bad_exit=False, extra=("--input=all",))
        worker = [sys.executable, "-m", "zsgd", "worker", "--connect", self.address, "--heartbeat", f"{self.heartbeat:g}",
                  "--timeout", f"{self.timeout:g}", "--join-timeout", f"{self.join_timeout:g}", "--watch-stdin"]
        return base + worker + (["--keys-stdin"] if self.keys is not None else []) + (["--model", self.model] if self.model else [])

    name = "slurm"

    def start(self, ranks: list[Any]) -> None:
        """The run's workers as one step: Slurm numbers its tasks 0 .. n-1, so these are workers 0 .. n-1."""
        ids = sorted(r.id for r in ranks if r.role == "worker")
        if ids != list(range(len(ids))) or len(ids) != len(ranks):
            from zsgd.errors import ZsgdError

            raise ZsgdError("--launcher slurm starts workers 0 .. n-1 as one srun step, and nothing else")
        if ids:
            self.start_step(len(ids))

    def lost(self) -> str | None:
        """The step ended: none of its workers can come back, so the run stops (with a checkpoint)."""
        step = self.children[0] if self.children else None
        if step is None or step.returncode is None:
            return None
        return f"the workers' srun step ended (exit {step.returncode}: {step.log_tail(2) or 'no output'})"

    def failed(self) -> str | None:
        """One line for a task of the step that ended on an error, else None.

        The step is one process (srun), whose exit code comes only when every task has ended; but srun says at once,
        on its stderr (the step's log), ``srun: error: NODE: task N: Exited with exit code 2`` for a task that exits
        so (a node that lacks the model's module), while the other tasks train on. The log is read from where the
        last call stopped; the worker's own line is the last ``zsgd: error:`` line before srun's."""
        step = self.children[0] if self.children else None
        if step is None or self._failure is not None:
            return self._failure
        try:
            with open(step.log_path, "rb") as f:
                f.seek(self._scanned)
                chunk = f.read()
        except OSError:
            return None
        chunk = chunk[:chunk.rfind(b"\n") + 1]  # whole lines only: the rest is read next time
        self._scanned += len(chunk)
        text = chunk.decode(errors="replace")
        found = SRUN_TASK_ERROR.search(text)
        said = [line.strip() for line in text[:found.start() if found else None].splitlines() if line.startswith("zsgd: error: ")]
        self._said = said[-1] if said else self._said
        if found is None:
            return failed_child(self.children)
        node, tasks = found.groups()
        why = self._said.removeprefix("zsgd: error: ") or f"see {step.log_path}"
        self._failure = f"worker {tasks} on {node} (task {tasks} of the srun step) failed: {why}"
        return self._failure

    def start_step(self, n: int) -> Any:
        """Start workers ``0 .. n - 1`` as one step; each takes its id from ``SLURM_PROCID``."""
        from zsgd.runtime.launch.forked import die_with_parent
        from zsgd.runtime.launch.local import Child
        from zsgd.runtime.threads import SINGLE_THREAD_ENV

        first_id = 0
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.log_dir / "workers-srun.log"
        env = os.environ | SINGLE_THREAD_ENV | {"PYTHONUNBUFFERED": "1"}
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(self.argv(n), stdin=subprocess.PIPE, stdout=log, stderr=subprocess.STDOUT, env=env,
                                    start_new_session=True, preexec_fn=die_with_parent)
        if self.keys is not None and proc.stdin is not None:
            import json

            try:
                for rank in range(n):
                    bundle = self.keys.bundle(f"worker-{first_id + rank}")
                    proc.stdin.write(json.dumps({"rank": first_id + rank} | bundle).encode() + b"\n")
                proc.stdin.flush()
            except (BrokenPipeError, OSError):
                pass  # srun already failed; its log says why
        child = Child(f"workers {first_id}-{first_id + n - 1} (srun step of job {self.plan.allocation.job_id})", proc, log_path)
        self.children.append(child)
        return child

    def running(self) -> list[Any]:
        return [c for c in self.children if c.returncode is None]

    def stop_all(self, grace: float = 5.0) -> None:
        """Wait ``grace`` s for the step to end on its own (the broker said LEAVE); then close its stdin
        (the workers' watchdogs end them); then SIGTERM srun, which signals its tasks; last, scancel the step."""
        import time

        def wait(seconds: float) -> None:
            deadline = time.monotonic() + seconds
            while self.running() and time.monotonic() < deadline:
                time.sleep(0.05)

        wait(grace)
        for c in self.children:
            if c.proc.stdin is not None and not c.proc.stdin.closed:
                try:
                    c.proc.stdin.close()
                except OSError:
                    pass
        wait(7.0)
        for c in self.running():
            c.proc.terminate()
        wait(10.0)
        if self.running():
            self.cancel_step()
            for c in self.running():
                c.proc.kill()
        for c in self.children:
            try:
                c.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass

    def cancel_step(self) -> None:
        """Last resort: ``scancel`` this run's step by its name, so no task outlives the run."""
        job = self.plan.allocation.job_id
        out = subprocess.run(["squeue", "-h", "--steps", "-j", job, "-o", "%i %j"], capture_output=True, text=True, timeout=30,
                             stdin=subprocess.DEVNULL)
        for line in out.stdout.splitlines():
            step, _, name = line.strip().partition(" ")
            if name == self.job_name:
                subprocess.run(["scancel", step], capture_output=True, timeout=30, stdin=subprocess.DEVNULL)


def make_slurm(ctx: Any) -> SlurmLauncher | None:
    """The srun-step launcher of ``zsgd run --launcher slurm`` (registered as ``slurm``); None outside such a run."""
    access = ctx.access
    if access.slurm is None:
        return None
    from zsgd.output.live import stderr_console

    address = access.remote_address(ctx.broker.address, access.slurm.advertise)
    alloc = access.slurm.allocation
    stderr_console.print(f"{access.slurm.n_workers} workers start as an srun step of Slurm job {alloc.job_id} on "
                         f"{', '.join(alloc.nodes[:4])}{' ...' if len(alloc.nodes) > 4 else ''}; they connect to [bold]{address}[/] (CURVE)")
    return SlurmLauncher(access.slurm, address, ctx.run_dir / "logs", ctx.heartbeat, ctx.timeout, ctx.broker.run, keys=access.keys,
                         model=ctx.model)
