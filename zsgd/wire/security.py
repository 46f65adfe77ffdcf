"""CURVE keys and the broker's gatekeeper (ZAP allow-list).

Why CURVE: a broker listening beyond loopback would otherwise accept any
process that can reach its port, and the model's weights and updates would
travel in clear. With CURVE the traffic is encrypted and authenticated; a
ZAP handler (the ZeroMQ guide's "ironhouse" pattern) admits only the client
keys of this run.

Key distribution never touches a command line (``ps`` shows those to every
user on a machine): the broker makes one server keypair and one client
keypair per worker for each run (or loads the server key from
``zsgd keys generate``), and hands each worker its keys as one JSON line on
stdin -- over the SSH channel for remote workers, a pipe for local ones -- or
in a file readable only by its owner (``--keys-file``).

A client without keys, with unknown keys, or holding the wrong server key
never completes the handshake, so it receives nothing and can inject
nothing. Every failed handshake is counted (``refused_clients`` in the
summary) and logged to ``security.log`` in the run directory.
"""

from __future__ import annotations

import json
import os
import select
import stat
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zmq
import zmq.utils.z85
# at the top, not in the thread: an import on the ZAP thread could hold a module lock at the moment
# 'zsgd run' forks a local worker (zsgd.runtime.launch.forked), and the child would wait on it for ever
from zmq.utils.monitor import parse_monitor_message

from zsgd.errors import ZsgdError
from zsgd.wire.auth import is_token, new_token

ZAP_ENDPOINT = "inproc://zeromq.zap.01"
ZAP_DOMAIN = b"zsgd"
SERVER_FILE = "server.json"
CLIENT_GLOB = "client-*.json"
RUN_SECRET_FILE = "run.json"  # a run without CURVE: its secret, for workers started by hand
KEYS_LINE_TIMEOUT_S = 30.0  # a worker told to read keys from stdin gives up after this


@dataclass(frozen=True)
class KeyPair:
    """A CURVE keypair as Z85 text (40 characters each), the form ZeroMQ and the JSON files use."""

    public: str
    secret: str

    @classmethod
    def generate(cls) -> "KeyPair":
        public, secret = zmq.curve_keypair()
        return cls(public.decode("ascii"), secret.decode("ascii"))


def client_bundle(server_public: str, client: KeyPair) -> dict[str, str]:
    """What one worker needs: the server's public key and its own keypair."""
    return {"server": server_public, "public": client.public, "secret": client.secret}


def curve_for_link(bundle: dict[str, Any]) -> dict[str, bytes]:
    """Validate a key bundle and turn it into the ``curve`` dict ``BrokerLink`` takes."""
    try:
        out = {k: str(bundle[k]).encode("ascii") for k in ("server", "public", "secret")}
    except (KeyError, TypeError, UnicodeEncodeError):
        raise ZsgdError("key bundle must be a JSON object with 'server', 'public' and 'secret' (Z85 CURVE keys)") from None
    for name, value in out.items():
        _check_z85(value, f"key bundle '{name}'")
    return out


@dataclass(frozen=True)
class Credentials:
    """What a started process was handed: CURVE keys for its link, or the run secret its HELLO proves."""

    curve: dict[str, bytes] | None = None
    token: str | None = None


def credentials(bundle: Any) -> Credentials:
    """Validate a keys line or file: CURVE keys (``server``, ``public``, ``secret``) or a run secret (``token``)."""
    if isinstance(bundle, dict) and "token" in bundle and not any(k in bundle for k in ("server", "public", "secret")):
        if not is_token(bundle["token"]):
            raise ZsgdError("key bundle 'token' is not a run secret (64 hex characters, as 'zsgd run' writes them)")
        return Credentials(token=bundle["token"])
    if not isinstance(bundle, dict):
        raise ZsgdError("key bundle must be a JSON object with CURVE keys ('server', 'public', 'secret') or a run secret ('token')")
    return Credentials(curve=curve_for_link(bundle))


def _check_z85(value: bytes, what: str) -> bytes:
    try:
        raw = zmq.utils.z85.decode(value)
    except (ValueError, KeyError, TypeError):
        raw = b""
    if len(value) != 40 or len(raw) != 32:
        raise ZsgdError(f"{what} is not a 40-character Z85 CURVE key")
    return raw


@dataclass
class RunKeys:
    """What authenticates one run's processes: CURVE keys, or (on loopback without ``--secure``) a run secret.

    With CURVE, the server's keypair and one client keypair per launched
    process; ``extra_allowed`` holds client public keys from ``zsgd keys
    generate``, so workers started by hand with ``--keys-file`` may join as
    well. Without CURVE (``server`` is None), the run secret (``zsgd.wire.auth``)
    is what every launched process gets instead, over the same channel.
    """

    server: KeyPair | None
    clients: dict[str, KeyPair] = field(default_factory=dict)
    extra_allowed: dict[str, str] = field(default_factory=dict)  # public -> name
    token: str = field(default_factory=new_token)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)  # the ZAP thread reads while launchers add

    @classmethod
    def create(cls, keys_dir: str | Path | None = None) -> "RunKeys":
        """CURVE keys for a secure run (made here, or the server key of a ``zsgd keys generate`` folder)."""
        if keys_dir is None:
            return cls(KeyPair.generate())
        server, allowed = load_keys_dir(keys_dir)
        return cls(server, extra_allowed=allowed)

    @classmethod
    def secret_only(cls) -> "RunKeys":
        """A run on loopback without CURVE: its processes prove themselves with the run secret alone."""
        return cls(None)

    @property
    def curve(self) -> bool:
        return self.server is not None

    def bundle(self, name: str) -> dict[str, str]:
        """What process ``name`` (e.g. ``worker-3``) is handed: its CURVE keys (made on first use), or the run secret."""
        if self.server is None:
            return {"token": self.token}
        with self._lock:
            if name not in self.clients:
                self.clients[name] = KeyPair.generate()
            return client_bundle(self.server.public, self.clients[name])

    def allowed(self) -> dict[str, str]:
        with self._lock:
            return {kp.public: name for name, kp in self.clients.items()} | self.extra_allowed

    def broker_curve(self) -> dict[str, Any] | None:
        """``BrokerOptions.curve``: the server keypair and the allow-list, read live (launchers add keys after the bind)."""
        if self.server is None:
            return None
        return {"secret": self.server.secret.encode(), "public": self.server.public.encode(), "allowed": self.allowed}

    def broker_token(self) -> str | None:
        """``BrokerOptions.token``: the secret a HELLO must prove, where CURVE does not authenticate."""
        return None if self.server is not None else self.token


# -- key files -------------------------------------------------------------------------
def write_secret_json(path: Path, obj: dict[str, Any]) -> None:
    """Write a JSON file only its owner can read (created 0600; never briefly world-readable)."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=1)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def read_secret_json(path: str | Path) -> dict[str, Any]:
    """Read a key file, refusing one that others can read (as ssh does with private keys)."""
    p = Path(path)
    try:
        mode = p.stat().st_mode
        text = p.read_text()
    except OSError as exc:
        raise ZsgdError(f"cannot read key file {p}: {exc.strerror or exc}") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ZsgdError(f"key file {p} is readable by other users; run 'chmod 600 {p}'")
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        raise ZsgdError(f"key file {p} is not JSON (make one with 'zsgd keys generate')") from None
    if not isinstance(data, dict):
        raise ZsgdError(f"key file {p}: expected a JSON object")
    return data


MAX_CLIENT_FILES = 10_000


def generate_keys_dir(directory: str | Path, n_clients: int, force: bool = False) -> list[Path]:
    """``zsgd keys generate``: a server keypair and ``n_clients`` client bundles."""
    d = Path(directory)
    if n_clients < 0:
        raise ZsgdError(f"--clients must be >= 0, got {n_clients}")
    if n_clients > MAX_CLIENT_FILES:
        raise ZsgdError(f"--clients {n_clients:,} is more than {MAX_CLIENT_FILES:,} key files; workers can share a client file")
    if (d / SERVER_FILE).exists() and not force:
        raise ZsgdError(f"{d / SERVER_FILE} exists; pass --force to replace the keys (running workers will be locked out)")
    written: list[Path] = []
    try:
        d.mkdir(parents=True, exist_ok=True)
        os.chmod(d, 0o700)
        if force:
            for old in d.glob(CLIENT_GLOB):
                old.unlink()
        server = KeyPair.generate()
        write_secret_json(d / SERVER_FILE, {"public": server.public, "secret": server.secret})
        written.append(d / SERVER_FILE)
        for i in range(1, n_clients + 1):
            path = d / f"client-{i}.json"
            write_secret_json(path, client_bundle(server.public, KeyPair.generate()))
            written.append(path)
    except OSError as exc:
        for path in written:  # a partial set of keys is worse than none: the server key would not match
            path.unlink(missing_ok=True)
        raise ZsgdError(f"cannot write keys to {d}: {exc.strerror or exc}") from None
    return written


def load_keys_dir(directory: str | Path) -> tuple[KeyPair, dict[str, str]]:
    """The server keypair and the allowed client public keys of a ``zsgd keys generate`` folder."""
    d = Path(directory)
    if not (d / SERVER_FILE).is_file():
        raise ZsgdError(f"{d} holds no {SERVER_FILE}; create keys with 'zsgd keys generate {d}'")
    data = read_secret_json(d / SERVER_FILE)
    try:
        server = KeyPair(str(data["public"]), str(data["secret"]))
    except KeyError:
        raise ZsgdError(f"{d / SERVER_FILE} lacks 'public' or 'secret'") from None
    _check_z85(server.public.encode(), f"{d / SERVER_FILE} 'public'")
    _check_z85(server.secret.encode(), f"{d / SERVER_FILE} 'secret'")
    allowed = {}
    for path in sorted(d.glob(CLIENT_GLOB)):
        bundle = curve_for_link(read_secret_json(path))
        if bundle["server"].decode() != server.public:
            raise ZsgdError(f"{path} was made for another server key; regenerate with 'zsgd keys generate {d} --force'")
        allowed[bundle["public"].decode()] = path.stem
    return server, allowed


def read_keys_line(fd: int = 0, timeout: float = KEYS_LINE_TIMEOUT_S, rank: int | None = None) -> Credentials:
    """Read one JSON line of keys (or the run secret) from ``fd`` (stdin) without buffering past it.

    Unbuffered so that whatever follows on stdin stays unread (the SSH
    watchdog waits for EOF on the same descriptor). With ``rank``, the
    lines are ``{"rank": R, ...bundle}``, one per worker of an srun step
    (which hands every task the same stdin): lines of other ranks are
    skipped, and this worker's line is the one it keeps."""
    deadline = time.monotonic() + timeout
    while True:
        data = b""
        while not data.endswith(b"\n"):
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise ZsgdError(f"--keys-stdin: no keys arrived on stdin within {timeout:g} s")
            chunk = os.read(fd, 1)
            if not chunk:
                break
            data += chunk
            if len(data) > 4096:
                raise ZsgdError("--keys-stdin: the keys line is too long")
        try:
            bundle = json.loads(data.decode("utf-8") or "null")
        except (UnicodeDecodeError, json.JSONDecodeError):
            bundle = None
        if not isinstance(bundle, dict):
            raise ZsgdError("--keys-stdin: expected one JSON line {\"server\": ..., \"public\": ..., \"secret\": ...} or {\"token\": ...}"
                            + (f" for rank {rank}" if rank is not None and data else ""))
        if rank is None or "rank" not in bundle or bundle["rank"] == rank:
            return credentials({k: v for k, v in bundle.items() if k != "rank"})


def is_loopback(host: str) -> bool:
    """True for addresses only this machine can reach (where CURVE is optional)."""
    import ipaddress

    if host in ("localhost", "ip6-localhost"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


# -- the broker's gatekeeper ----------------------------------------------------------------
_HANDSHAKE_FAILED = zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_AUTH
_REASONS = {zmq.EVENT_HANDSHAKE_FAILED_AUTH: "client key not on this run's allow-list",
            zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL: "handshake failed"}
_DETAILS = {int(zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH): "no CURVE keys (plain-text client)",
            int(zmq.PROTOCOL_ERROR_ZMTP_CRYPTOGRAPHIC): "wrong server key (the handshake could not be decrypted)"}
LOG_FIRST = 100  # refusals logged one by one; after that, every 1000th


class CurveGuard:
    """ZAP handler plus handshake monitor for one CURVE ROUTER, on one thread.

    Own ZAP handler rather than pyzmq's ``ThreadAuthenticator``: the same
    thread also reads the socket monitor, so every refused connection is
    counted whatever the cause -- no keys at all (mechanism mismatch), the
    wrong server key (the handshake cannot be decrypted), or a client key not
    on the allow-list (ZAP says 400). ``refused`` is read by the broker.
    """

    def __init__(self, ctx: zmq.Context, allowed, log_path: Path | None = None) -> None:
        self.ctx = ctx
        self._allowed = allowed  # dict public->name, or a callable returning one
        self.log_path = Path(log_path) if log_path else None
        self.refused = 0
        self.disconnects = 0  # connections closed by libzmq or the peer (the endpoint reports them)
        self.handshakes_failed = 0  # each is followed by a disconnect, which is not a dropped connection of the run
        self._probes_left = 0  # reach tests zsgd itself is about to make (expect_probes)
        self._stop = threading.Event()
        self._monitor_addr = f"inproc://zsgd-monitor-{uuid.uuid4().hex}"
        self._zap = ctx.socket(zmq.REP)  # bound here, before the ROUTER binds; used only by the thread afterwards
        self._zap.linger = 0
        try:
            self._zap.bind(ZAP_ENDPOINT)
        except zmq.ZMQError as exc:
            self._zap.close()
            raise ZsgdError(f"cannot start the CURVE authenticator: {exc}") from None
        self._thread = threading.Thread(target=self._serve, name="zsgd-zap", daemon=True)

    def attach(self, sock: zmq.Socket) -> None:
        """Make ``sock`` a CURVE server that asks this guard; call before ``bind``."""
        sock.zap_domain = ZAP_DOMAIN
        sock.monitor(self._monitor_addr, _HANDSHAKE_FAILED | zmq.EVENT_DISCONNECTED)
        self._thread.start()

    def allowed_keys(self) -> dict[bytes, str]:
        table = self._allowed() if callable(self._allowed) else self._allowed
        out = {}
        for public, name in (table.items() if isinstance(table, dict) else ((k, "client") for k in table)):
            key = public.encode() if isinstance(public, str) else bytes(public)
            out[zmq.utils.z85.decode(key)] = str(name)
        return out

    def expect_probes(self, n: int) -> None:
        """``n`` connections that open and close without a handshake are zsgd's own reach tests: not refusals."""
        self._probes_left += n

    @property
    def dropped(self) -> int:
        """Connections of admitted peers that closed (a failed handshake's own disconnect is not one)."""
        return max(0, self.disconnects - self.handshakes_failed)

    def stop(self) -> None:
        """End the thread and close its sockets (before the context is terminated)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        else:
            self._zap.close(linger=0)

    def _log(self, text: str) -> None:
        if self.log_path is None:
            return
        try:
            with open(self.log_path, "a") as f:
                f.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {text}\n")
        except OSError:
            pass

    def _serve(self) -> None:
        mon = self.ctx.socket(zmq.PAIR)
        mon.linger = 0
        mon.connect(self._monitor_addr)
        poller = zmq.Poller()
        poller.register(self._zap, zmq.POLLIN)
        poller.register(mon, zmq.POLLIN)
        try:
            while not self._stop.is_set():
                events = dict(poller.poll(100))
                if self._zap in events:
                    frames = self._zap.recv_multipart()
                    try:
                        self._answer(frames)
                    except Exception as exc:  # never let the gate die: a dead ZAP handler would stall every handshake
                        self._log(f"ZAP handler error ({exc!r}); denying")
                        self._zap.send_multipart([b"1.0", frames[1] if len(frames) > 1 else b"", b"500", b"internal error", b"", b""])
                if mon in events:
                    try:
                        event = parse_monitor_message(mon.recv_multipart())
                    except (ValueError, IndexError):
                        continue
                    where = event["endpoint"].decode(errors="replace")
                    if event["event"] == zmq.EVENT_DISCONNECTED:
                        self.disconnects += 1
                    elif event["event"] & _HANDSHAKE_FAILED:
                        self.handshakes_failed += 1
                        if event["event"] == zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL and self._probes_left > 0:
                            # The peer hung up mid-handshake, as zsgd's own reach test does (one per remote host):
                            # logged, not counted. Any other such hang-up -- a plain-text client that sent its
                            # greeting and left, a scanner -- is a refused client like the rest.
                            self._probes_left -= 1
                            self._log(f"a connection closed during the handshake (errno {int(event['value'])}) on {where}")
                            continue
                        self.refused += 1
                        if self.refused <= LOG_FIRST or self.refused % 1000 == 0:  # a client retrying for hours must not fill the disk
                            reason = _DETAILS.get(int(event["value"]), _REASONS.get(event["event"], "handshake failed"))
                            if event["event"] == zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL:
                                reason = f"hung up during the handshake (errno {int(event['value'])}; a plain-text client or a scanner)"
                            self._log(f"refused a client ({self.refused} so far): {reason} on {where}")
        finally:
            self._zap.close(linger=0)
            mon.close(linger=0)

    def _answer(self, frames: list[bytes]) -> None:
        """One ZAP request: frames are version, request id, domain, address, identity, mechanism, credentials."""
        if len(frames) < 6:  # malformed; a REP socket must still answer before it can read the next request
            self._zap.send_multipart([b"1.0", frames[1] if len(frames) > 1 else b"", b"400", b"malformed ZAP request", b"", b""])
            return
        version, request_id, _domain, address, _identity, mechanism = frames[:6]
        creds = frames[6:]
        name = self.allowed_keys().get(creds[0]) if mechanism == b"CURVE" and creds else None
        if name is None and self.refused < LOG_FIRST:
            who = zmq.utils.z85.encode(creds[0]).decode() if mechanism == b"CURVE" and creds and len(creds[0]) == 32 else "-"
            self._log(f"denied {mechanism.decode(errors='replace')} client at {address.decode(errors='replace')}: key {who} is not one of this run's")
        if name is None:
            self._zap.send_multipart([version, request_id, b"400", b"unknown client key", b"", b""])
        else:
            self._zap.send_multipart([version, request_id, b"200", b"OK", name.encode(), b""])
