"""The hosts file: which machines run workers, and how many on each.

One host per line, ``[user@]host[:port] [slots=N] [servers=N] [python=/path/to/python]``,
with blank lines and ``#`` comments. The ``host slots=N`` form is the one MPI
and DeepSpeed hostfiles use, so an existing hostfile works unchanged. ``host``
may be an alias from ``~/.ssh/config``: zsgd hands it to ``ssh`` as written,
so users' ProxyJump, keys and ports keep working.

Errors name the file, the line and what is wrong, because a typo in line 37
of a cluster's hostfile should cost seconds, not a failed run.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from zsgd.errors import ZsgdError

FORMAT = "[user@]host[:port] [slots=N] [servers=N] [python=/path/to/python]"
KNOWN_KEYS = ("slots", "servers", "python")
MAX_SERVERS = 64  # range servers of --servers K placed on one host
MAX_SLOTS = 1024  # more on one host is a typo, not a machine
#: A host line becomes ssh's command line (and the hosts file is read whole): a longer line is a pasted
#: blob, not a host, and would fail later as "Argument list too long" from exec.
MAX_LINE = 1024
MAX_HOST_NAME = 253  # the longest DNS name
MAX_FILE_BYTES = 1 << 20  # a megabyte of hosts file is some 30,000 hosts
_HOST_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._%-]*$")  # names, IPv4, ssh aliases; never an option ("-o...")
_USER_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]*$")


@dataclass(frozen=True)
class Host:
    """One line of the hosts file."""

    host: str
    user: str | None = None
    port: int | None = None
    slots: int = 1
    python: str | None = None  # interpreter on the host; None: the venv 'zsgd remote init' made, else python3
    line: int = 0
    source: str = ""  # the hosts file, for messages
    servers: int = 0  # range servers of --servers K to run here (zsgd.runtime.server.sharded), besides its slots workers

    @property
    def label(self) -> str:
        """Short, unique name for tables, log folders and worker labels."""
        base = f"[{self.host}]" if ":" in self.host else self.host
        return f"{base}:{self.port}" if self.port else base

    @property
    def where(self) -> str:
        """``FILE:LINE``, so a message points at the line to fix."""
        return f"{self.source}:{self.line}" if self.source else self.label

    def ssh_destination(self) -> list[str]:
        """The arguments that name this host to ``ssh`` (port first: options precede the destination)."""
        args = ["-p", str(self.port)] if self.port else []
        return [*args, f"{self.user}@{self.host}" if self.user else self.host]

    def safe_label(self) -> str:
        """The label as a file name (log folders in the run directory)."""
        return re.sub(r"[^A-Za-z0-9._@-]", "_", self.label)


def parse_hosts(text: str, source: str = "<hosts>") -> list[Host]:
    """Parse hosts-file text; raise ZsgdError naming ``source:line`` on the first problem."""
    hosts: list[Host] = []
    seen: dict[tuple[str | None, str, int | None], int] = {}
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        if len(line) > MAX_LINE:
            raise _error(source, lineno, f"line is {len(line):,} characters long; a host line has at most {MAX_LINE:,} "
                                         f"(format: {FORMAT})")
        host = _parse_line(line, lineno, source)
        key = (host.user, host.host, host.port)
        if key in seen:
            raise _error(source, lineno, f"{host.label} is already listed on line {seen[key]}; give one line slots=N instead")
        seen[key] = lineno
        hosts.append(host)
    if not hosts:
        raise ZsgdError(f"{source}: no hosts listed (one per line: {FORMAT})")
    return hosts


def load_hosts(path: str | Path) -> list[Host]:
    """Read and parse a hosts file."""
    p = Path(path)
    try:
        if p.exists() and not p.is_file():  # a FIFO would block, a device never end
            raise ZsgdError(f"hosts file {p} is not a regular file")
        with open(p, "rb") as f:
            data = f.read(MAX_FILE_BYTES + 1)
        if len(data) > MAX_FILE_BYTES:
            raise ZsgdError(f"hosts file {p} is larger than {MAX_FILE_BYTES >> 20} MiB; it should list one host per line ({FORMAT})")
        text = data.decode("utf-8")
    except FileNotFoundError:
        raise ZsgdError(f"hosts file {p} not found (one host per line: {FORMAT}; see ssh_hosts.txt)") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ZsgdError(f"cannot read hosts file {p}: {getattr(exc, 'strerror', None) or exc}") from None
    return parse_hosts(text, str(p))


def _error(source: str, lineno: int, what: str) -> ZsgdError:
    return ZsgdError(f"{source}:{lineno}: {what}")


def _short(value: str) -> str:
    """``value`` quoted for a message, cut to 60 characters."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _parse_line(line: str, lineno: int, source: str) -> Host:
    fields = line.split()
    user, host, port = _parse_destination(fields[0], lineno, source)
    slots, servers, python = 1, 0, None
    given: set[str] = set()
    for field in fields[1:]:
        key, sep, value = field.partition("=")
        if not sep or not value:
            raise _error(source, lineno, f"expected key=value after the host, got {_short(field)} (format: {FORMAT})")
        if key not in KNOWN_KEYS:
            raise _error(source, lineno, f"unknown key {_short(key)}; known keys: {', '.join(KNOWN_KEYS)}")
        if key in given:
            raise _error(source, lineno, f"{key}= given twice")
        given.add(key)
        if key == "slots":
            if not (value.isascii() and value.isdigit()) or not 1 <= int(value) <= MAX_SLOTS:
                raise _error(source, lineno, f"slots must be a whole number from 1 to {MAX_SLOTS}, got {_short(value)}")
            slots = int(value)
        elif key == "servers":
            if not (value.isascii() and value.isdigit()) or not 0 <= int(value) <= MAX_SERVERS:
                raise _error(source, lineno, f"servers must be a whole number from 0 to {MAX_SERVERS}, got {_short(value)}")
            servers = int(value)
        else:
            if any(c in value for c in "'\"`$\\;|&<>(){}*?") or ("/" in value and not value.startswith(("/", "~/"))):
                raise _error(source, lineno, f"python= needs an absolute path (e.g. /usr/bin/python3 or ~/venv/bin/python) "
                                             f"or a command name, got {_short(value)}")
            python = value
    return Host(host=host, user=user, port=port, slots=slots, servers=servers, python=python, line=lineno, source=source)


def _parse_destination(dest: str, lineno: int, source: str) -> tuple[str | None, str, int | None]:
    user = None
    if "@" in dest:
        user, dest = dest.rsplit("@", 1)
        if not user or not _USER_RE.match(user):
            raise _error(source, lineno, f"bad user name {_short(user)}")
    port_text = None
    if dest.startswith("["):  # [IPv6]:port
        end = dest.find("]")
        if end < 0:
            raise _error(source, lineno, f"unclosed '[' in {_short(dest)}")
        host, rest = dest[1:end], dest[end + 1:]
        if rest:
            if not rest.startswith(":"):
                raise _error(source, lineno, f"unexpected {_short(rest)} after ']'")
            port_text = rest[1:]
        if not re.match(r"^[0-9A-Fa-f:.%a-z]+$", host):
            raise _error(source, lineno, f"bad IPv6 address {_short(host)}")
    else:
        host, sep, port_text = dest.partition(":")
        if not sep:
            port_text = None
        if not host or not _HOST_RE.match(host) or len(host) > MAX_HOST_NAME:
            raise _error(source, lineno, f"bad host name {_short(host)} (at most {MAX_HOST_NAME} characters; format: {FORMAT})")
    port = None
    if port_text is not None:
        if not (port_text.isascii() and port_text.isdigit()) or not 1 <= int(port_text) <= 65535:
            raise _error(source, lineno, f"port must be 1-65535, got {_short(port_text)}")
        port = int(port_text)
    return user, host, port
