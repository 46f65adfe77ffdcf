"""A real OpenSSH server on loopback addresses, for the remote-worker tests.

``SshServer.start(tmp)`` generates a host key and a user key with
``ssh-keygen``, writes an ``sshd_config`` listening on 127.0.0.2 and
127.0.0.3 (two "hosts", loopback only) on a free high port, and a client
``ssh_config`` (known-hosts checks off, the generated identity, the port)
that tests pass to zsgd with ``--ssh-config``. The alias ``badkey`` points at
127.0.0.3 with a key the server does not accept.

Why real sshd: the point of these tests is that zsgd works with the user's
own OpenSSH (options, errors, session teardown), which a mock cannot show.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

SSHD = "/usr/sbin/sshd"
HOSTS = ("127.0.0.2", "127.0.0.3")
DOWN_HOST = "127.0.0.4"  # nothing listens there


def missing_reason() -> str | None:
    """Why the SSH tests cannot run here, or None."""
    if not os.path.exists(SSHD):
        return f"{SSHD} not installed (Debian: apt install openssh-server; scripts/setup.sh does it)"
    for tool in ("ssh", "ssh-keygen"):
        if shutil.which(tool) is None:
            return f"'{tool}' not installed (Debian: apt install openssh-client)"
    if os.geteuid() != 0:
        return "sshd tests run as root (they log in as the current user via a root-owned sshd)"
    try:
        with socket.socket() as s:
            s.bind((HOSTS[1], 0))
    except OSError:
        return "loopback addresses 127.0.0.2/127.0.0.3 are not usable here"
    return None


def free_port(hosts=HOSTS) -> int:
    """A port free on every address in ``hosts``."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind((hosts[0], 0))
            port = s.getsockname()[1]
        try:
            for h in hosts[1:]:
                with socket.socket() as s:
                    s.bind((h, port))
            return port
        except OSError:
            continue
    raise RuntimeError("no free port")


def keygen(path: Path, comment: str = "zsgd-test") -> Path:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)], check=True, capture_output=True)
    return path


@dataclass
class SshServer:
    root: Path
    port: int
    proc: subprocess.Popen
    ssh_config: Path
    user_key: Path
    log: Path

    @classmethod
    def start(cls, root: Path) -> "SshServer":
        root.mkdir(parents=True, exist_ok=True)
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # sshd's privilege-separation directory
        host_key = keygen(root / "ssh_host_ed25519_key", "zsgd-test-host")
        user_key = keygen(root / "id_ed25519")
        bad_key = keygen(root / "id_refused")
        (root / "authorized_keys").write_text((root / "id_ed25519.pub").read_text())
        port = free_port()
        config = root / "sshd_config"
        config.write_text("\n".join([
            f"Port {port}",
            *(f"ListenAddress {h}" for h in HOSTS),
            f"HostKey {host_key}",
            f"PidFile {root / 'sshd.pid'}",
            f"AuthorizedKeysFile {root / 'authorized_keys'}",
            "PermitRootLogin prohibit-password",
            "PubkeyAuthentication yes",
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            "UsePAM no",
            "StrictModes no",
            "AcceptEnv ZSGD_TEST_SESSION",  # the orphan check (conftest) then sees remote workers as this session's
            "MaxStartups 200",
            "MaxSessions 50",
            "LogLevel VERBOSE",
            "",
        ]))
        ssh_config = root / "ssh_config"
        ssh_config.write_text("\n".join([
            "Host badkey",
            "  HostName 127.0.0.3",
            f"  IdentityFile {bad_key}",
            "Host * !badkey",
            f"  IdentityFile {user_key}",
            "Host *",
            f"  Port {port}",
            "  User root",
            "  IdentitiesOnly yes",
            "  IdentityAgent none",
            "  StrictHostKeyChecking no",
            "  UserKnownHostsFile /dev/null",
            "  GlobalKnownHostsFile /dev/null",
            "  LogLevel ERROR",
            "  SendEnv ZSGD_TEST_SESSION",
            "",
        ]))
        log = root / "sshd.log"
        with open(log, "ab") as f:
            proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(config)], stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        server = cls(root, port, proc, ssh_config, user_key, log)
        server.wait_ready()
        return server

    def wait_ready(self, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"sshd exited {self.proc.returncode}: {self.log.read_text()[-2000:]}")
            try:
                for h in HOSTS:
                    socket.create_connection((h, self.port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"sshd did not start: {self.log.read_text()[-2000:]}")

    def ssh(self, host: str, command: str, timeout: float = 30) -> subprocess.CompletedProcess:
        return subprocess.run(["ssh", "-F", str(self.ssh_config), "-o", "BatchMode=yes", host, command], capture_output=True, text=True,
                              timeout=timeout, stdin=subprocess.DEVNULL)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@dataclass
class PreparedHosts:
    """The session's sshd and the two hosts ``zsgd remote init`` prepared (``prepared_hosts``)."""

    server: SshServer
    root: Path  # the sshd's folder; tests put their hosts files here
    src: Path  # the snapshot of the checkout that init ran from
    remote_dir: Path  # --remote-dir on both hosts (they share this machine's file system)
    init: subprocess.CompletedProcess  # the first 'zsgd remote init' (its test checks it)
    init_s: float

    @property
    def ssh_args(self) -> list[str]:
        return ["--ssh-config", str(self.server.ssh_config), "--remote-dir", str(self.remote_dir), "--connect-timeout", "5"]


@pytest.fixture(scope="session")
def prepared_hosts(tmp_path_factory):
    """A real sshd on ``HOSTS`` for the whole session, both hosts prepared once by ``zsgd remote init
    --system-site-packages`` (a wheel, a venv, the kernels compiled on each host: about 20 s) from a snapshot of the
    checkout, so edits to the working tree meanwhile cannot change the wheel. test_remote.py and test_torch_remote.py
    each prepared the same two hosts before. Skips where there is no OpenSSH server."""
    from helpers import REPO, run_zsgd

    reason = missing_reason()
    if reason is not None:
        pytest.skip(f"no OpenSSH server: {reason}")
    root = tmp_path_factory.mktemp("ssh-hosts")
    src = root / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    for folder in ("zsgd", "scripts"):
        shutil.copytree(REPO / folder, src / folder, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.nbi", "*.nbc"))
    server = SshServer.start(root / "sshd")
    try:
        hosts = root / "hosts-init.txt"
        hosts.write_text("".join(f"{h} slots=1 python={sys.executable}\n" for h in HOSTS))
        remote_dir = root / "remote-zsgd"
        ssh_args = ["--ssh-config", str(server.ssh_config), "--remote-dir", str(remote_dir), "--connect-timeout", "5"]
        t0 = time.monotonic()
        init = run_zsgd("remote", "init", str(hosts), *ssh_args, "--system-site-packages", cwd=src, timeout=600)
        yield PreparedHosts(server, root, src, remote_dir, init, time.monotonic() - t0)
    finally:
        server.stop()
