"""Talking to hosts through the user's own OpenSSH client.

Why the ``ssh`` binary and not a Python SSH library: users' ``~/.ssh/config``,
agents, ProxyJump, certificates and hardware keys then just work, exactly as
they do when the user types ``ssh host``. zsgd only adds what a program needs:
``BatchMode=yes`` (never hang on a password prompt), a ``ConnectTimeout`` (a
dead host costs seconds, not minutes) and keep-alives (a dropped link is
noticed by ssh, so the run notices it too). ``--ssh-config FILE`` and
``--ssh-option OPT`` reach every ssh call zsgd makes.

Remote commands are one line of POSIX ``sh``; Python snippets travel
base64-encoded inside it, so no login shell's quoting rules can mangle them.
Failures are turned into one sentence naming the host, the cause and the fix.
"""

from __future__ import annotations

import base64
import json
import shlex
import subprocess
from dataclasses import dataclass

from zsgd.errors import ZsgdError
from zsgd.remote.hosts import Host

DEFAULT_REMOTE_DIR = "~/.zsgd"
PROBE_TAG = "ZSGD-PROBE "
MIN_PYTHON = (3, 10)


class HostError(ZsgdError):
    """A host could not be used; the message names it, the cause and what to do."""

    def __init__(self, host: Host, reason: str) -> None:
        super().__init__(f"{host.label}: {reason}")
        self.host = host
        self.reason = reason


@dataclass(frozen=True)
class SshOptions:
    """How zsgd calls ``ssh``; the same for ``run`` and ``remote init|check``."""

    config: str | None = None  # ssh -F FILE
    options: tuple[str, ...] = ()  # each becomes "-o OPT"; the user's come first, so they win
    connect_timeout: int = 10  # seconds; 10 s is enough for a LAN or a jump host, raise it for slow links
    remote_dir: str = DEFAULT_REMOTE_DIR  # where 'zsgd remote init' keeps its venv on each host

    def base(self, stdin: bool = False) -> list[str]:
        args = ["ssh"]
        if self.config:
            args += ["-F", self.config]
        for opt in self.options:
            args += ["-o", opt]
        args += ["-o", "BatchMode=yes", "-o", f"ConnectTimeout={self.connect_timeout}", "-o", "ServerAliveInterval=5",
                 "-o", "ServerAliveCountMax=3", "-T", "-x"]
        if not stdin:
            args.append("-n")
        return args

    def argv(self, host: Host, script: str, stdin: bool = False) -> list[str]:
        """``ssh ... host 'sh -c SCRIPT'``: the remote login shell only ever sees one quoted word."""
        return [*self.base(stdin), *host.ssh_destination(), "sh -c " + shlex.quote(script)]

    def run(self, host: Host, script: str, input: bytes | None = None, timeout: float | None = None) -> subprocess.CompletedProcess:
        """Run ``script`` on ``host``; a timeout becomes exit code 255 with a 'timed out' reason."""
        limit = timeout if timeout is not None else self.connect_timeout + 30
        try:
            return subprocess.run(self.argv(host, script, stdin=input is not None), input=input, capture_output=True, timeout=limit)
        except subprocess.TimeoutExpired:
            return subprocess.CompletedProcess([], 255, b"", f"zsgd: ssh timed out after {limit:g} s".encode())
        except FileNotFoundError:
            raise ZsgdError("the OpenSSH client 'ssh' is not installed here (Debian/Ubuntu: apt install openssh-client)") from None

    def resolve(self, host: Host) -> dict[str, str]:
        """``ssh -G``: the effective user, hostname and port after the user's ssh config (no network)."""
        try:
            out = subprocess.run([*self.base(), "-G", *host.ssh_destination()], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return {}
        if out.returncode != 0:
            return {}
        conf = {}
        for line in out.stdout.splitlines():
            key, _, value = line.partition(" ")
            conf.setdefault(key.lower(), value.strip())
        return conf


def parallel(fn, items: list, workers: int = 32) -> list:
    """``fn`` over ``items`` on threads (each call mostly waits on an ssh process), results in order."""
    from concurrent.futures import ThreadPoolExecutor

    if not items:
        return []
    with ThreadPoolExecutor(max_workers=min(workers, len(items))) as pool:
        return list(pool.map(fn, items))


def remote_dir_sh(remote_dir: str) -> str:
    """The remote directory as a sh word; ``~`` expands to the remote user's home."""
    if remote_dir == "~":
        return '"$HOME"'
    if remote_dir.startswith("~/"):
        return '"$HOME"/' + shlex.quote(remote_dir[2:])
    return shlex.quote(remote_dir)


def python_sh(host: Host, remote_dir: str, prefer_venv: bool = True) -> str:
    """sh that sets ``D`` (zsgd's folder) and ``PY`` (the interpreter to use) on the host.

    The venv ``zsgd remote init`` made wins; else ``python=`` from the hosts
    file; else ``python3``."""
    py = (remote_dir_sh(host.python) if host.python.startswith("~") else shlex.quote(host.python)) if host.python else "python3"
    if not prefer_venv:
        return f"D={remote_dir_sh(remote_dir)}; PY={py}"
    return f'D={remote_dir_sh(remote_dir)}; if [ -x "$D/venv/bin/python" ]; then PY="$D/venv/bin/python"; else PY={py}; fi'


def python_code_sh(code: str) -> str:
    """``-c CODE`` for a sh line: base64, so quotes and newlines survive any shell."""
    b64 = base64.b64encode(code.encode()).decode()
    return "-c " + shlex.quote(f"import base64;exec(base64.b64decode('{b64}'))")


def no_python_sh(tag: str) -> str:
    """sh: report (as a tagged JSON line) and stop when ``$PY`` is not runnable."""
    return (f'if ! command -v "$PY" >/dev/null 2>&1; then printf "%s\\n" "{tag}{{\\"error\\": \\"no-python\\", \\"python\\": \\"$PY\\"}}"; '
            "exit 0; fi")


PROBE_CODE = r'''
import json, os, sys
out = {"python": "%d.%d.%d" % tuple(sys.version_info[:3]), "executable": sys.executable, "realpath": os.path.realpath(sys.executable),
       "venv": sys.prefix != getattr(sys, "base_prefix", sys.prefix)}
d = os.path.expanduser(sys.argv[1])
try:
    with open(os.path.join(d, "installed.json")) as f:
        out["installed"] = json.load(f)
except Exception:
    out["installed"] = None
if sys.version_info >= (3, 10):
    try:
        import zsgd
        out["zsgd"] = zsgd.__version__
    except Exception as exc:
        out["zsgd"] = None
        out["zsgd_error"] = "%s: %s" % (type(exc).__name__, exc)
reach = sys.argv[2] if len(sys.argv) > 2 else ""
if reach:
    import socket
    h, p = reach.rsplit(":", 1)
    try:
        socket.create_connection((h.strip("[]"), int(p)), timeout=float(sys.argv[3])).close()
        out["reach"] = "ok"
    except Exception as exc:
        out["reach"] = "%s" % (exc.strerror if getattr(exc, "strerror", None) else exc)
print("ZSGD-PROBE " + json.dumps(out))
'''


@dataclass
class Probe:
    """What one ssh call learned about a host."""

    host: Host
    ok: bool
    reason: str = ""
    python: str | None = None
    executable: str | None = None
    realpath: str | None = None
    zsgd: str | None = None
    venv: bool = False
    installed: dict | None = None
    reach: str | None = None
    seconds: float = 0.0


def probe_host(ssh: SshOptions, host: Host, reach: str | None = None, prefer_venv: bool = True, reach_timeout: float = 5.0) -> Probe:
    """One ssh round trip: can we log in, which Python, is zsgd importable, can the host reach ``reach`` (HOST:PORT)."""
    import time

    t0 = time.monotonic()
    script = (f"{python_sh(host, ssh.remote_dir, prefer_venv)}; {no_python_sh(PROBE_TAG)}; "
              f'exec "$PY" {python_code_sh(PROBE_CODE)} "$D" {shlex.quote(reach or "")} {reach_timeout:g}')
    proc = ssh.run(host, script, timeout=ssh.connect_timeout + reach_timeout + 30)
    seconds = time.monotonic() - t0
    data = parse_tagged(proc.stdout, PROBE_TAG)
    if data is None:
        return Probe(host, False, explain_failure(host, ssh, proc), seconds=seconds)
    p = Probe(host, True, python=data.get("python"), executable=data.get("executable"), realpath=data.get("realpath"), zsgd=data.get("zsgd"), venv=bool(data.get("venv")),
              installed=data.get("installed"), reach=data.get("reach"), seconds=seconds)
    if data.get("error") == "no-python":
        p.ok, p.reason = False, (f"no Python at {data.get('python')!r}; install Python >= 3.10 there, or set python=/path/to/python3 "
                                 f"on {host.where}")
    elif p.python and tuple(int(x) for x in p.python.split(".")[:2]) < MIN_PYTHON:
        p.ok, p.reason = False, (f"Python {p.python} at {p.executable} is too old (zsgd needs >= 3.10); set python=/path/to/python3.10+ "
                                 f"on {host.where}")
    return p


def parse_tagged(stdout: bytes | str, tag: str) -> dict | None:
    """The JSON after ``tag`` on the last tagged line (login banners and rc-file noise are skipped)."""
    text = stdout.decode(errors="replace") if isinstance(stdout, bytes) else stdout
    for line in reversed(text.splitlines()):
        if line.startswith(tag):
            try:
                data = json.loads(line[len(tag):])
            except json.JSONDecodeError:
                return None
            return data if isinstance(data, dict) else None
    return None


def explain_failure(host: Host, ssh: SshOptions, proc: subprocess.CompletedProcess) -> str:
    """One sentence for a failed ssh call: what went wrong and what to do."""
    err = proc.stderr.decode(errors="replace") if isinstance(proc.stderr, bytes) else (proc.stderr or "")
    low = err.lower()
    dest = " ".join(host.ssh_destination())
    import re

    said = re.search(r"port (\d+):", err)  # ssh names the port it used, whatever the config said
    port = said.group(1) if said else (host.port or "22")
    if "could not resolve hostname" in low or "name or service not known" in low:
        return f"unknown host: ssh cannot resolve {host.host!r}; fix the name on {host.where} or add it to your ~/.ssh/config"
    if "permission denied" in low:
        return (f"permission denied: the host refused your SSH key; install your public key there (ssh-copy-id {dest}) "
                f"or load it into ssh-agent, then check with 'ssh {dest} true'")
    if "host key verification failed" in low or "remote host identification has changed" in low:
        return f"host key not trusted: connect once with 'ssh {dest}' to check and accept its key"
    if "connection refused" in low:
        return f"connection refused on port {port}: no SSH server there; is sshd running on the host and the port right ({host.where})?"
    if "timed out" in low:
        return f"no answer within {ssh.connect_timeout} s: the host is down or a firewall blocks port {port}"
    if "no route to host" in low or "network is unreachable" in low:
        return "unreachable: no network route to the host; is it up and on this network?"
    if "connection closed" in low or "connection reset" in low:
        return "the SSH connection was closed by the host (too many connections, or sshd refuses this user)"
    last = [line for line in err.strip().splitlines() if line.strip()]
    if proc.returncode == 127 or "not found" in low:
        return f"a command was not found on the host ({last[-1] if last else 'exit 127'}); run 'zsgd remote check' to see what is missing"
    return f"ssh failed with exit {proc.returncode}: {last[-1] if last else 'no message'}"
