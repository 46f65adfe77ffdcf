"""Shared memory for the two big arrays of an exchange when a worker and its broker share a machine.

Why: on one host the parameter server's cost is not its step but moving
every update and every reply through TCP: each 4.8 MB cnn message is
copied into the kernel by the sender, out of it by ZeroMQ's I/O thread,
and both run on the cores the workers compute on. Measured on the 2-core
VM, a sync round of 2 workers spent about 20 ms of its 60 ms outside the
gradient. Through a shared file the gradient and the weights are each
copied once, by the process that owns them (the worker computes on the
reply slot in place: no copy on its receive path), and the socket carries
a header of a few hundred bytes.

How: the worker creates a file in ``/dev/shm`` (the temp folder where there
is none), mode 0600, with two slots of ``n`` float32: ``update`` (worker
writes, broker reads) and ``reply`` (broker writes, worker reads). It names
the file in the ``shm_offer`` meta of its first UPDATE, which still carries
its gradient over the socket. A broker that can open and check the file
(a regular file of its own user, not readable by others, the right size
and magic) maps it, removes its name, and from then on replies to that
worker with WEIGHTS whose ``shm`` meta is the reply slot's sequence number
instead of the array; the worker answers in kind. A broker on another
machine cannot open the name and simply goes on over TCP, so offering is
always safe. The socket still carries every message, so ordering, liveness
and the emulated network are the same as over TCP.

Each slot has a sequence number (seqlock): odd while its writer copies,
then even; a message names the even number it was written under, and the
reader checks it before and after its copy (the worker, which reads the
weights in place, before and after its step: ``WorkerShare.intact``), so a
slot overwritten under a reader is an error (``shm-stale``) or a void step,
never silently mixed data. The
message itself is the synchronisation (a send and a receive are system
calls, so the copy is visible to the reader on every architecture).
"""

from __future__ import annotations

import mmap
import os
import stat
import sys
import tempfile
import uuid
from dataclasses import replace
from pathlib import Path

import numpy as np

from zsgd.errors import ProtocolError
from zsgd.wire.frames import Message, MsgType

MAGIC = b"ZSGDSHM1"
PREFIX = "zsgd-shm-"
_HEADER = 64  # magic, n, then one uint64 sequence number per slot
SLOTS = ("update", "reply")


def shm_dir() -> Path:
    """Where the files go: ``/dev/shm`` (memory) when the machine has it, else the temp folder."""
    d = Path("/dev/shm")
    return d if d.is_dir() and os.access(d, os.W_OK) else Path(tempfile.gettempdir())


def file_bytes(n: int) -> int:
    return _HEADER + 2 * 4 * int(n)


def enabled_by_default() -> bool:
    """``ZSGD_SHARED_MEMORY=0`` keeps every exchange on the socket (to measure TCP, or to rule this out)."""
    return os.environ.get("ZSGD_SHARED_MEMORY", "1").strip().lower() not in ("0", "no", "off", "false")


def sweep_orphans(directory: Path | None = None) -> int:
    """Remove this user's slot files whose worker has died; how many.

    A file lives under its name only from the worker's first update until
    its broker maps it (or the worker exits), so one is left behind only by
    a worker killed with SIGKILL in that window. The next worker on the
    machine sweeps it. Removing the file of a live worker this process
    cannot see (another PID namespace sharing the folder) costs no more than
    a declined offer: that worker's exchange stays on the socket."""
    removed = 0
    for path in (directory or shm_dir()).glob(f"{PREFIX}*"):
        try:
            pid = int(path.name[len(PREFIX):].split("-", 1)[0])
            if path.lstat().st_uid != os.getuid() or pid <= 0:
                continue
            os.kill(pid, 0)
        except ProcessLookupError:
            path.unlink(missing_ok=True)
            removed += 1
        except (ValueError, OSError):  # not our naming, gone already, or a live process of another user
            continue
    return removed


def broker_on_this_machine(address: str) -> bool:
    """Whether a ZeroMQ address can only be this machine (``ipc://``, a loopback host): the workers that offer.

    A worker elsewhere would offer harmlessly (its broker cannot open the
    name and declines), but its file would then live as long as it does, and
    one killed with SIGKILL would leave it in ``/dev/shm``."""
    import ipaddress
    import socket

    if address.startswith(("ipc://", "inproc://")):
        return True
    if not address.startswith("tcp://"):
        return False
    host = address[len("tcp://"):].rsplit(":", 1)[0].strip("[]")
    try:
        infos = socket.getaddrinfo(host, None)
    except (OSError, UnicodeError):
        return False
    return bool(infos) and all(ipaddress.ip_address(info[4][0].split("%")[0]).is_loopback for info in infos)


class Declined(ValueError):
    """Why a broker did not take an offer; ``reason`` is the key it is counted under."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


class SharedSlots:
    """One worker's two slots, mapped by the worker (``create``) and by its broker (``attach``)."""

    def __init__(self, mm: mmap.mmap, n: int, path: Path) -> None:
        self._mm, self.n, self.path = mm, int(n), path
        self._seq = np.frombuffer(mm, np.uint64, count=len(SLOTS), offset=16)
        self._slot = {name: np.frombuffer(mm, np.float32, count=self.n, offset=_HEADER + i * 4 * self.n) for i, name in enumerate(SLOTS)}

    @classmethod
    def create(cls, n: int) -> "SharedSlots":
        sweep_orphans()
        path = shm_dir() / f"{PREFIX}{os.getpid()}-{uuid.uuid4().hex}"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0), 0o600)
        try:
            os.ftruncate(fd, file_bytes(n))
            mm = mmap.mmap(fd, file_bytes(n))
        except OSError:
            os.close(fd)
            path.unlink(missing_ok=True)
            raise
        os.close(fd)
        mm[:8] = MAGIC
        np.frombuffer(mm, np.uint64, count=1, offset=8)[0] = n
        return cls(mm, n, path)

    @classmethod
    def attach(cls, offer: object, n: int) -> "SharedSlots":
        """Map the file a peer offered; :class:`Declined` unless it is safe and fits a model of ``n`` parameters."""
        if not isinstance(offer, dict) or not isinstance(offer.get("path"), str):
            raise Declined("no-file", "the offer names no file")
        path = Path(offer["path"])
        if path.parent != shm_dir() or not path.name.startswith(PREFIX):
            raise Declined("not-a-zsgd-file", f"{path} is not a zsgd shared-memory file here")
        try:
            fd = os.open(path, os.O_RDWR | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0))
        except OSError as exc:  # another machine's file, most often
            raise Declined("cannot-open", f"cannot open {path}: {exc.strerror}") from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077:
                raise Declined("not-private", f"{path} is not a private file of this user")
            if st.st_size != file_bytes(n):
                raise Declined("wrong-size", f"{path} has {st.st_size} bytes, not {file_bytes(n)}")
            mm = mmap.mmap(fd, file_bytes(n))
        finally:
            os.close(fd)
        if mm[:8] != MAGIC or int(np.frombuffer(mm, np.uint64, count=1, offset=8)[0]) != n:
            mm.close()
            raise Declined("wrong-layout", f"{path} is not laid out for {n} parameters")
        return cls(mm, n, path)

    def offer(self) -> dict:
        return {"path": str(self.path), "n": self.n}

    def put(self, slot: str, array: np.ndarray) -> int:
        """Copy ``array`` into ``slot``; the sequence number to name in the message."""
        i = SLOTS.index(slot)
        self._seq[i] += np.uint64(1)  # odd: being written
        np.copyto(self._slot[slot], np.asarray(array, np.float32).reshape(-1))
        self._seq[i] += np.uint64(1)
        return int(self._seq[i])

    def take(self, slot: str, seq: object, out: np.ndarray | None = None) -> np.ndarray:
        """A copy of ``slot`` as written under ``seq`` (into ``out`` when given); ProtocolError if it was not, or was overwritten meanwhile."""
        i = SLOTS.index(slot)
        if not isinstance(seq, int) or isinstance(seq, bool) or seq <= 0 or seq % 2:
            raise ProtocolError("bad-schema", f"shm sequence {seq!r} is not a positive even number")
        if int(self._seq[i]) != seq:
            raise ProtocolError("shm-stale", f"{slot} slot is at {int(self._seq[i])}, the message says {seq}")
        if out is None:
            out = np.empty(self.n, np.float32)
        out.flags.writeable = True  # a buffer of the caller's, handed out read-only last time
        np.copyto(out, self._slot[slot])
        if int(self._seq[i]) != seq:
            raise ProtocolError("shm-stale", f"{slot} slot was rewritten while it was read")
        return out

    def view(self, slot: str, seq: object) -> np.ndarray:
        """``slot`` itself, read-only, as written under ``seq`` (no copy); ProtocolError as :meth:`take`. The writer
        may rewrite it later: whoever holds the view checks :meth:`holds` once done with it."""
        if not self.holds(slot, seq):
            i = SLOTS.index(slot)
            if not isinstance(seq, int) or isinstance(seq, bool) or seq <= 0 or seq % 2:
                raise ProtocolError("bad-schema", f"shm sequence {seq!r} is not a positive even number")
            raise ProtocolError("shm-stale", f"{slot} slot is at {int(self._seq[i])}, the message says {seq}")
        view = self._slot[slot].view()
        view.flags.writeable = False
        return view

    def holds(self, slot: str, seq: object) -> bool:
        """Whether ``slot`` is (still) as written under ``seq``: not rewritten since, nor being rewritten."""
        good = isinstance(seq, int) and not isinstance(seq, bool) and seq > 0 and not seq % 2
        return good and int(self._seq[SLOTS.index(slot)]) == seq

    def unlink(self) -> None:
        """Remove the file's name (both mappings stay valid): nothing is left behind whatever happens next."""
        try:
            self.path.unlink()
        except OSError:
            pass

    def close(self) -> None:
        self._seq = None  # type: ignore[assignment]
        self._slot = {}
        try:
            self._mm.close()
        except BufferError:  # an array still views it: the mapping goes when that array does
            pass


class WorkerShare:
    """The worker's end: with ``n`` set, makes its slots when it sends its first dense update (a worker killed while
    it waits for its first weights leaves no file), offers them in that update, and uses them once the broker has."""

    def __init__(self, n: int = 0) -> None:
        self.n = int(n)  # 0: not offered (a broker elsewhere, compressed updates, or switched off)
        self.slots: SharedSlots | None = None
        self.active = False  # the broker took them
        self._offered = False

    def outgoing(self, msg: Message) -> Message:
        """A dense UPDATE with its gradient in the slot once the broker took them; the offer on the first one."""
        dense_update = msg.type == MsgType.UPDATE and msg.codec == "none" and "g" in msg.arrays
        if not dense_update or not self.n or (self._offered and not self.active):
            return msg
        if self.active:
            seq = self.slots.put("update", msg.arrays["g"])
            return replace(msg, arrays={k: a for k, a in msg.arrays.items() if k != "g"}, meta=msg.meta | {"shm": seq})
        self._offered = True
        try:
            self.slots = SharedSlots.create(self.n)
        except OSError:  # no room in /dev/shm, say: the exchange stays on the socket
            return msg
        return replace(msg, meta=msg.meta | {"shm_offer": self.slots.offer()})

    def incoming(self, msg: Message) -> Message | None:
        """WEIGHTS whose array the broker left in the reply slot, with that array put back as a read-only view of the
        slot: no copy, the model reads the weights where the broker wrote them. None when the slot already holds
        newer weights (their message is on its way: read them from that one).

        The broker writes the slot again only with newer weights for this worker, so whoever uses the view asks
        :meth:`intact` once done with it: False means the weights changed under it and what was computed from them
        is void, exactly as if they had been superseded before they were read (None above)."""
        if msg.type != MsgType.WEIGHTS or "shm" not in msg.meta:
            return msg
        if self.slots is None:
            raise ProtocolError("bad-schema", "weights in shared memory this worker never offered")
        if not self.active:
            self.active = True
            self.slots.unlink()  # the broker removed the name when it mapped the file; this covers one that did not
        try:
            w = self.slots.view("reply", msg.meta["shm"])
        except ProtocolError as exc:
            if exc.reason == "shm-stale":
                return None
            raise
        return replace(msg, arrays={"w": w, **msg.arrays})

    def intact(self, msg: Message) -> bool:
        """Whether the weights ``msg`` carried are still as they arrived: always for weights in a frame; for weights in
        the reply slot (:meth:`incoming`), whether the broker has not rewritten the slot since."""
        if msg.type != MsgType.WEIGHTS or "shm" not in msg.meta or self.slots is None:
            return True
        return self.slots.holds("reply", msg.meta["shm"])

    def close(self) -> None:
        if self.slots is not None:
            self.slots.unlink()


class SharedPeers:
    """The broker's end: the slots of each worker that offered them, by ZeroMQ identity."""

    def __init__(self, n_params: int, enabled: bool = True) -> None:
        self.n = int(n_params)
        self.enabled = enabled  # False: every offer is declined ("switched-off"), and the exchange stays on the socket
        self.slots: dict[bytes, SharedSlots] = {}
        self.declined: dict[str, int] = {}  # why offers were not taken (another machine's file, most often)
        self.taken = 0  # offers taken, over the run
        self._pool: list[np.ndarray] = []

    def incoming(self, identity: bytes, msg: Message) -> Message:
        """An UPDATE as if its gradient had come over the socket; takes an offer on the way. ProtocolError if a
        message names a slot this peer has none of, or one that was overwritten."""
        if msg.type != MsgType.UPDATE:
            return msg
        offer = msg.meta.get("shm_offer")
        if offer is not None and identity not in self.slots and not self.enabled:
            self.declined["switched-off"] = self.declined.get("switched-off", 0) + 1
        elif offer is not None and identity not in self.slots:
            try:
                slots = SharedSlots.attach(offer, self.n)
            except Declined as exc:
                self.declined[exc.reason] = self.declined.get(exc.reason, 0) + 1
            else:
                slots.unlink()  # both ends have it mapped: no name is left to clean up, whatever ends either process
                self.slots[identity] = slots
                self.taken += 1
        if "shm" not in msg.meta:
            return msg
        slots = self.slots.get(identity)
        if slots is None:
            raise ProtocolError("bad-schema", "an update in shared memory from a peer that has none here")
        if "g" in msg.arrays:
            raise ProtocolError("bad-schema", "an update with its gradient both in shared memory and in a frame")
        grad = slots.take("update", msg.meta["shm"], out=self._buffer())
        grad.flags.writeable = False  # as a received frame's view is
        return replace(msg, arrays={"g": grad, **msg.arrays})

    def _buffer(self) -> np.ndarray:
        """A gradient buffer nobody else holds any more (the algorithms may keep an update past its handling:
        a sync round's), reused so that each update does not fault in 4.8 MB of fresh pages."""
        for buf in self._pool:
            if sys.getrefcount(buf) <= 3:  # the pool's list, this loop's name, getrefcount's argument
                return buf
        buf = np.empty(self.n, np.float32)
        self._pool.append(buf)
        return buf

    def outgoing(self, identity: bytes, msg: Message) -> Message:
        """Full WEIGHTS for a peer with slots: the array goes into its reply slot, the message names it."""
        slots = self.slots.get(identity)
        if slots is None or msg.type != MsgType.WEIGHTS or msg.codec != "none" or "w" not in msg.arrays:
            return msg
        seq = slots.put("reply", msg.arrays["w"])
        return replace(msg, arrays={k: a for k, a in msg.arrays.items() if k != "w"}, meta=msg.meta | {"shm": seq})

    def summary(self) -> dict:
        return {"shared_memory_links": self.taken, "shared_memory_declined": dict(self.declined)}

    def forget(self, identity: bytes) -> None:
        slots = self.slots.pop(identity, None)
        if slots is not None:
            slots.close()

    def close(self) -> None:
        for identity in list(self.slots):
            self.forget(identity)


__all__ = ["Declined", "broker_on_this_machine", "sweep_orphans", "SharedPeers", "SharedSlots", "WorkerShare", "enabled_by_default", "file_bytes", "shm_dir"]
