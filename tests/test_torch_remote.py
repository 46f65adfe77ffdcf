"""A PyTorch model (``--model torch:package.module:factory``) trained by workers on other machines:
over SSH (``zsgd run --remote``, a real sshd on loopback addresses, ``sshd.py``) and as a Slurm job
step (``--launcher slurm``, a real one-node cluster, ``slurm_cluster.py``).

A user model runs only where its module imports, so each test puts a tiny 2-layer MLP module where
the README ("Your own PyTorch model") tells a user to: copied into each host's login directory (where
a remote worker starts), or pip-installed into the venv ``zsgd remote init`` made there; under Slurm,
the directory ``zsgd run`` is started from (srun starts its tasks there). The broker imports it from
its own current directory. Each test checks that the remote workers trained that module (its
parameter count, the host of every worker, an accuracy well above chance). Without ``--model``
forwarded by the launcher the workers refuse the model and these tests fail.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from helpers import run_zsgd, summary_of
from sshd import HOSTS, SshServer

pytest.importorskip("torch")
pytestmark = [pytest.mark.slow, pytest.mark.torch]

TINY_MLP = '''"""A 2-layer MLP: zsgd's factory for a user's own PyTorch module (the tests of remote workers)."""
import math

from torch import nn


def make(input_shape=(1, 28, 28), n_classes=10):
    return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), 32), nn.ReLU(), nn.Linear(32, n_classes))
'''
#: Appended to TINY_MLP: the factory fails in any process but the one that imported the module first (the broker).
WORKERS_LACK_A_DEPENDENCY = '''
import os

_IMPORTED_BY = os.getpid()
_make = make


def make(*args, **kwargs):
    if os.getpid() != _IMPORTED_BY:
        raise ModuleNotFoundError("No module named 'torchvision'", name="torchvision")
    return _make(*args, **kwargs)
'''
#: Prepended to TINY_MLP: importing the module fails in srun task 1 only (a node without a dependency).
TASK_1_LACKS_A_DEPENDENCY = '''import os

if os.environ.get("SLURM_PROCID") == "1":
    raise ModuleNotFoundError("No module named 'torchvision'", name="torchvision")
'''
N_PARAMS = 784 * 32 + 32 + 32 * 10 + 10
CHANCE = 0.1
STEPS = 50  # sync rounds: the MLP is at 0.65 after 50 on 3 workers (0.74 after 100), well above CHANCE + 0.3
RUN = ["--algo", "sync", "--data", "embedded", "--steps", str(STEPS), "--batch-size", "32", "--lr", "0.05", "--heartbeat", "0.5", "--timeout", "10",
       "--quiet", "--no-plots"]


def write_module(folder: Path, package: str) -> Path:
    """``folder/package/__init__.py`` holding the MLP; the folder is where the spec ``package:make`` resolves."""
    (folder / package).mkdir(parents=True)
    (folder / package / "__init__.py").write_text(TINY_MLP)
    return folder


def check_trained(out: Path, hosts: set[str], n_workers: int) -> dict:
    s = summary_of(out)
    assert s["n_params"] == N_PARAMS, s  # the MLP, not a built-in model
    assert s["updates"] >= STEPS and s["worker_deaths"] == 0 and s["n_workers"] == n_workers, s
    assert {w["host"] for w in s["workers"].values()} == hosts, s["workers"]
    assert all(w["steps"] > 0 for w in s["workers"].values()), s["workers"]
    assert s["test_accuracy"] > CHANCE + 0.3, s
    return s


# -- over SSH ------------------------------------------------------------------------------------

class Cluster:
    def __init__(self, server: SshServer, remote_dir: Path, root: Path) -> None:
        self.server, self.root = server, root
        self.remote_dir = remote_dir
        self.hosts = root / "hosts.txt"
        self.hosts.write_text("".join(f"{h} slots=1 python={sys.executable}\n" for h in HOSTS))

    @property
    def ssh_args(self) -> list[str]:
        return ["--ssh-config", str(self.server.ssh_config), "--remote-dir", str(self.remote_dir), "--connect-timeout", "5"]

    def ssh(self, host: str, command: str) -> str:
        out = self.server.ssh(host, command, timeout=120)
        assert out.returncode == 0, f"ssh {host} {command}: {out.stderr}"
        return out.stdout

    def scp(self, source: Path, target: str) -> None:
        """``scp -r SOURCE TARGET``, as the README says; ``-O`` (the scp protocol): this sshd has no sftp subsystem."""
        def scp(*flags: str) -> subprocess.CompletedProcess:
            return subprocess.run(["scp", *flags, "-q", "-r", "-F", str(self.server.ssh_config), "-o", "BatchMode=yes", str(source), target],
                                  capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)

        out = scp("-O")
        if out.returncode != 0 and "option" in out.stderr:  # OpenSSH < 9: no -O, the scp protocol is the default
            out = scp()
        assert out.returncode == 0, out.stderr

    def run(self, *args: str, cwd: Path) -> subprocess.CompletedProcess:
        return run_zsgd("run", "--remote", str(self.hosts), *self.ssh_args, *args, cwd=cwd, timeout=300)


@pytest.fixture(scope="module")
def cluster(prepared_hosts, tmp_path_factory):
    """A real sshd on 127.0.0.2 and 127.0.0.3, both hosts prepared by ``zsgd remote init --system-site-packages``
    (torch then comes from this machine's Python), from a snapshot of the checkout: the session's
    (``sshd.prepared_hosts``, shared with test_remote.py)."""
    assert prepared_hosts.init.returncode == 0, prepared_hosts.init.stderr[-3000:]
    return Cluster(prepared_hosts.server, prepared_hosts.remote_dir, tmp_path_factory.mktemp("torch-cluster"))


def test_remote_workers_train_a_module_copied_to_their_login_directory(cluster, tmp_path, no_orphans):
    """The README's ``scp -r PACKAGE HOST:``: a remote worker starts in the login directory, and imports the
    module from there (the hosts share this machine's file system: one copy serves both, and is removed)."""
    package = f"zsgd_test_mlp_{uuid.uuid4().hex[:8]}"  # unique: the login directory is this machine's real home
    write_module(tmp_path / "project", package)
    login_dirs = {cluster.ssh(h, "pwd").strip() for h in HOSTS}
    assert len(login_dirs) == 1 and login_dirs != {""}, login_dirs
    copied = Path(login_dirs.pop()) / package
    assert not copied.exists()
    try:
        cluster.scp(tmp_path / "project" / package, f"{HOSTS[0]}:")
        assert (copied / "__init__.py").is_file()
        out = tmp_path / "run"
        proc = cluster.run("--n-proc", "1", "--model", f"torch:{package}:make", *RUN, "--out", str(out), cwd=tmp_path / "project")
        assert proc.returncode == 0, proc.stderr[-3000:]
    finally:
        cluster.ssh(HOSTS[0], f"rm -rf -- {shlex.quote(str(copied))}")
    for wid, h in ((1, HOSTS[0]), (2, HOSTS[1])):  # first: a worker that could not load the module says why here
        log = (out / "logs" / "hosts" / h / f"worker-{wid}.log").read_text()
        assert "joined run" in log and "done" in log, log
    s = check_trained(out, {*HOSTS, summary_of(out)["workers"]["0"]["host"]}, 3)
    assert s["workers"]["1"]["host"] == HOSTS[0] and s["workers"]["2"]["host"] == HOSTS[1]  # local first, then the hosts


def test_remote_workers_train_a_module_installed_into_the_remote_venv(cluster, tmp_path, no_orphans):
    """The README's other way: pip-install the package into the venv ``zsgd remote init`` made on each host
    (here under --remote-dir); workers on the hosts only, nothing in their login directory."""
    package = "zsgd_test_mlp_venv"
    project = write_module(tmp_path / "project", package)
    (project / "pyproject.toml").write_text(f'[build-system]\nrequires = ["setuptools"]\nbuild-backend = "setuptools.build_meta"\n\n'
                                            f'[project]\nname = "{package.replace("_", "-")}"\nversion = "0.1"\n\n'
                                            f'[tool.setuptools]\npackages = ["{package}"]\n')
    shipped = cluster.remote_dir / f"{package}-src"
    cluster.scp(project, f"{HOSTS[0]}:{shipped}")
    venv_py = cluster.remote_dir / "venv" / "bin" / "python"
    # offline: the build backend is this machine's setuptools (the venv sees the system's packages)
    cluster.ssh(HOSTS[0], f"{venv_py} -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation {shlex.quote(str(shipped))}")
    login_dir = Path(cluster.ssh(HOSTS[1], "pwd").strip())
    assert not (login_dir / package).exists()
    try:
        out = tmp_path / "run"
        proc = cluster.run("--n-proc", "0", "--model", f"torch:{package}:make", *RUN, "--out", str(out), cwd=project)
        assert proc.returncode == 0, proc.stderr[-3000:]
    finally:
        cluster.ssh(HOSTS[0], f"{venv_py} -m pip uninstall -q -y {package.replace('_', '-')}")
    for wid, h in ((0, HOSTS[0]), (1, HOSTS[1])):
        log = (out / "logs" / "hosts" / h / f"worker-{wid}.log").read_text()
        assert "joined run" in log and "done" in log, log
    check_trained(out, set(HOSTS), 2)


def test_a_remote_host_without_the_module_fails_the_run_with_one_line(cluster, tmp_path, no_orphans):
    """The module is importable here (the broker and the local worker load it from the run's directory) but on
    no host: the remote workers fail at start-up while the local one trains. That was a "worker death" and exit 0;
    the run must end with exit 2 and one line that names a host and the missing module."""
    package = f"zsgd_test_missing_{uuid.uuid4().hex[:8]}"  # unique: never in the hosts' login directory
    project = write_module(tmp_path / "project", package)
    out = tmp_path / "run"
    proc = cluster.run("--n-proc", "1", "--model", f"torch:{package}:make", *RUN, "--steps", "100000", "--out", str(out), cwd=project)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    error = [line for line in proc.stderr.splitlines() if line.startswith("zsgd: error:")]
    assert len(error) == 1, proc.stderr[-3000:]
    assert re.search(rf"worker-[12]@127\.0\.0\.[23] failed: .*No module named '{package}'", error[0]), error
    assert not (out / "summary.json").exists()  # not a finished run


# -- on this machine -----------------------------------------------------------------------------

def test_local_workers_that_cannot_build_the_module_fail_the_run_with_one_line(tmp_path, no_orphans):
    """``--n-proc 2``: the broker builds the module, its forked workers cannot (a dependency they lack, here
    raised in any process but the one that first imported the module): exit 2 and one line naming a worker."""
    package = "zsgd_test_mlp_local_fail"
    project = write_module(tmp_path / "project", package)
    init = project / package / "__init__.py"
    init.write_text(init.read_text() + WORKERS_LACK_A_DEPENDENCY)
    proc = run_zsgd("run", "--n-proc", "2", "--model", f"torch:{package}:make", *RUN, "--out", str(tmp_path / "run"), cwd=project, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    error = [line for line in proc.stderr.splitlines() if line.startswith("zsgd: error:")]
    assert len(error) == 1 and re.search(r"worker-[01] failed: .*No module named 'torchvision'", error[0]), proc.stderr[-3000:]


# -- under Slurm ---------------------------------------------------------------------------------

def test_slurm_step_workers_train_a_module_from_the_run_directory(slurm, tmp_path, no_orphans):
    """``salloc -n 3 zsgd run --model torch:...`` from the folder holding the module: 2 workers as one srun
    step (srun starts its tasks in the caller's directory), CURVE keys on the step's stdin."""
    package = "zsgd_test_mlp_slurm"
    project = write_module(tmp_path / "project", package)
    out = tmp_path / "run"
    t0 = time.monotonic()
    proc = slurm.client(["salloc", "-n", "3", sys.executable, "-m", "zsgd", "run", "--model", f"torch:{package}:make", *RUN,
                         "--out", str(out)], cwd=project, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 workers start as an srun step" in proc.stderr, proc.stderr[-3000:]
    log = (out / "logs" / "workers-srun.log").read_text()
    assert log.count("joined run") == 2 and "error" not in log, log
    check_trained(out, {slurm.node}, 2)
    assert time.monotonic() - t0 < 120
    slurm.wait_idle()



def test_slurm_step_task_without_a_dependency_fails_the_run_with_one_line(slurm, tmp_path, no_orphans):
    """Task 1 of the step cannot import the module (a node without a dependency) while task 0 trains. The step
    is one process (srun), which ends only with its last task: the run must still end at once, with exit 2 and one
    line naming worker 1, its node and what is missing."""
    package = "zsgd_test_mlp_slurm_task_fails"
    project = write_module(tmp_path / "project", package)
    init = project / package / "__init__.py"
    init.write_text(TASK_1_LACKS_A_DEPENDENCY + init.read_text())
    out = tmp_path / "run"
    proc = slurm.client(["salloc", "-n", "3", sys.executable, "-m", "zsgd", "run", "--model", f"torch:{package}:make", *RUN,
                         "--steps", "100000", "--out", str(out)], cwd=project, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    error = [line for line in proc.stderr.splitlines() if line.startswith("zsgd: error:")]
    assert len(error) == 1, proc.stderr[-3000:]
    assert re.search(rf"worker 1 on {re.escape(slurm.node)} \(task 1 of the srun step\) failed: .*No module named 'torchvision'", error[0]), error
    assert not (out / "summary.json").exists()
    slurm.wait_idle()
