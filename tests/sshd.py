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
import time
from dataclasses import dataclass
from pathlib import Path

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
