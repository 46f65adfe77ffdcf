"""A real one-node Slurm cluster in a temporary directory, for the launcher tests.

``SlurmCluster.start(root)`` writes a munge key and starts ``munged`` on its
own socket, writes a ``slurm.conf`` that lists this host (loopback address,
free ports, ``CPUs=8`` with ``SlurmdParameters=config_overrides`` so that a
2-core machine can grant ``salloc -n 4``), starts ``slurmctld`` and
``slurmd`` in the foreground with a fresh state directory, and waits until
the node is idle. ``env`` is what a client (``salloc``, ``sbatch``,
``srun``, ``squeue``) needs: ``SLURM_CONF`` pointing at the generated file.
``stop()`` cancels every job, waits until none is left, then ends the
daemons it started, by pid.

Why real daemons rather than a fake ``srun`` on PATH: what the launcher must
get right (the step's environment, ``SLURM_PROCID``, what ``scancel`` and a
time limit do to a step, that no step is left in ``squeue --steps``) is
Slurm's behaviour, which a stand-in would only restate.

``missing_reason()`` says why the cluster cannot run here (binaries missing,
not root); ``slurm`` (the session fixture) skips with that reason, or with
the daemons' own log lines when they start but never become ready.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("munge", "salloc", "sbatch", "srun", "squeue", "scancel", "sinfo")
NODE_CPUS = 8


def missing_reason() -> str | None:
    """Why a Slurm cluster cannot be started here, or None."""
    for tool in DAEMONS + CLIENTS:
        if shutil.which(tool) is None and not os.path.exists(f"/usr/sbin/{tool}"):
            return f"'{tool}' not installed (Debian: apt install slurm-wlm munge; scripts/setup.sh does it)"
    if os.geteuid() != 0:
        return "the Slurm tests run as root (slurmd must start job steps; SlurmUser=root)"
    return None


def _free_ports(n: int) -> list[int]:
    """``n`` distinct ports free on loopback right now."""
    socks, ports = [], []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
            ports.append(s.getsockname()[1])
    finally:
        for s in socks:
            s.close()
    return ports


def _exe(name: str) -> str:
    return shutil.which(name) or f"/usr/sbin/{name}"


@dataclass
class SlurmCluster:
    root: Path
    conf: Path
    node: str
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)

    @property
    def env(self) -> dict[str, str]:
        """The environment a Slurm client of this cluster runs in (outside any allocation)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
        return env | {"SLURM_CONF": str(self.conf)}

    @classmethod
    def start(cls, root: Path | None = None, cpus: int = NODE_CPUS) -> "SlurmCluster":
        root = Path(root or tempfile.mkdtemp(prefix="zsgd-slurm-"))
        root.mkdir(parents=True, exist_ok=True)
        os.chmod(root, 0o755)  # munged insists that everyone may traverse its socket's directory
        for sub in ("state", "spool", "logs"):
            (root / sub).mkdir(exist_ok=True)
        node = socket.gethostname().split(".")[0]
        key = root / "munge.key"
        key.write_bytes(os.urandom(1024))
        os.chmod(key, 0o600)
        ctld_port, slurmd_port = _free_ports(2)
        cluster = cls(root, root / "slurm.conf", node)
        cluster.conf.write_text(cluster._config(ctld_port, slurmd_port, cpus))
        try:
            cluster._spawn("munged", [_exe("munged"), "-F", f"--key-file={key}", f"--socket={cluster.munge_socket}",
                                      f"--pid-file={root / 'munged.pid'}", f"--log-file={root / 'logs/munged.log'}",
                                      f"--seed-file={root / 'munged.seed'}"])
            cluster._wait(lambda: cluster.munge_socket.is_socket(), 15, "munged's socket")
            cluster._spawn("slurmctld", [_exe("slurmctld"), "-D", "-i", "-f", str(cluster.conf)])
            cluster._spawn("slurmd", [_exe("slurmd"), "-D", "-N", node, "-f", str(cluster.conf)])
            cluster._wait(cluster._node_idle, 30, f"node {node} to become idle")
        except BaseException:
            cluster.stop()
            raise
        return cluster

    @property
    def munge_socket(self) -> Path:
        return self.root / "munge.sock"

    def _config(self, ctld_port: int, slurmd_port: int, cpus: int) -> str:
        r = self.root
        return "\n".join([
            f"ClusterName=zsgdtest{os.getpid()}",  # a fresh state directory goes with it, so a changed name is never refused
            f"SlurmctldHost={self.node}(127.0.0.1)",
            f"SlurmctldPort={ctld_port}",
            f"SlurmdPort={slurmd_port}",
            "AuthType=auth/munge", "CredType=cred/munge", f"AuthInfo=socket={self.munge_socket}",
            "SlurmUser=root", "SlurmdUser=root",
            f"StateSaveLocation={r / 'state'}", f"SlurmdSpoolDir={r / 'spool'}",
            f"SlurmctldPidFile={r / 'slurmctld.pid'}", f"SlurmdPidFile={r / 'slurmd.pid'}",
            f"SlurmctldLogFile={r / 'logs/slurmctld.log'}", f"SlurmdLogFile={r / 'logs/slurmd.log'}",
            "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none",  # no cgroups needed (containers, CI)
            "SelectType=select/cons_tres", "SelectTypeParameters=CR_CPU",
            "SchedulerType=sched/backfill", "JobAcctGatherType=jobacct_gather/none", "AccountingStorageType=accounting_storage/none",
            "MpiDefault=none", "ReturnToService=2", "MailProg=/bin/true",
            "SlurmdParameters=config_overrides",  # trust CPUs= below rather than the hardware count
            "KillWait=5", "MinJobAge=5", "InactiveLimit=0",
            f"NodeName={self.node} NodeAddr=127.0.0.1 CPUs={cpus} State=UNKNOWN",
            f"PartitionName=debug Nodes={self.node} Default=YES MaxTime=INFINITE State=UP",
            "",
        ])

    def _spawn(self, name: str, argv: list[str]) -> None:
        log = open(self.root / "logs" / f"{name}.out", "ab")
        self.procs[name] = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                            env=self.env, start_new_session=True)
        log.close()

    def _node_idle(self) -> bool:
        out = self.client(["sinfo", "-h", "-n", self.node, "-o", "%T"], timeout=10)
        return out.returncode == 0 and out.stdout.strip().startswith("idle")

    def _wait(self, predicate, timeout: float, what: str) -> None:
        """Wait for ``predicate`` with a deadline; a daemon that died or never got there skips with its log."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            dead = [n for n, p in self.procs.items() if p.poll() is not None]
            if dead:
                raise SlurmUnavailable(f"{dead[0]} exited {self.procs[dead[0]].returncode}: {self.log_tail(dead[0])}")
            if predicate():
                return
            time.sleep(0.1)
        raise SlurmUnavailable(f"timed out after {timeout} s waiting for {what}: {self.log_tail('slurmd')} {self.log_tail('slurmctld')}")

    def log_tail(self, name: str, n: int = 3) -> str:
        lines: list[str] = []
        for path in (self.root / "logs" / f"{name}.out", self.root / "logs" / f"{name}.log"):
            if path.exists():
                lines += path.read_text(errors="replace").strip().splitlines()
        return " | ".join(lines[-n:])

    def client(self, argv: list[str], timeout: float = 60, env: dict[str, str] | None = None, **kwargs) -> subprocess.CompletedProcess:
        """Run a Slurm client command (or anything) against this cluster."""
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL,
                              env=(env or self.env), **kwargs)

    def jobs(self) -> list[str]:
        out = self.client(["squeue", "-h", "-o", "%i %T"], timeout=10)
        return out.stdout.split("\n") if out.stdout.strip() else []

    def steps(self) -> list[str]:
        """Job steps still known to slurmctld (``squeue --steps``)."""
        out = self.client(["squeue", "-h", "--steps", "-o", "%i %j"], timeout=10)
        return [line for line in out.stdout.splitlines() if line.strip()]

    def wait_idle(self, timeout: float = 30) -> None:
        """Until no job or step is left (finished jobs linger a moment in squeue as COMPLETING)."""
        self._wait(lambda: not self.jobs() and not self.steps(), timeout, "every job to end")

    def stop(self) -> None:
        """Cancel all jobs, wait for them, then end the daemons this cluster started (by pid), newest first."""
        if "slurmctld" in self.procs and self.procs["slurmctld"].poll() is None:
            self.client(["scancel", "--full", "-u", "root"], timeout=10)
            try:
                self.wait_idle(timeout=20)
            except SlurmUnavailable:
                pass
        for name in reversed(list(self.procs)):
            proc = self.procs[name]
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=5)


class SlurmUnavailable(RuntimeError):
    """The daemons could not be brought up here (the tests skip, naming why)."""


@pytest.fixture(scope="session")
def slurm():
    """A running one-node cluster for the whole session; skips where it cannot run."""
    reason = missing_reason()
    if reason:
        pytest.skip(f"no Slurm: {reason}")
    try:
        cluster = SlurmCluster.start()
    except SlurmUnavailable as exc:
        pytest.skip(f"Slurm daemons cannot run here: {exc}")
    try:
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(cluster.root, ignore_errors=True)
