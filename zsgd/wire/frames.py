"""Frames on the wire: one small binary+JSON header, then raw array buffers.

A zsgd message is a ZeroMQ multipart message::

    frame 0      header = b"ZS" | u8 PROTOCOL_VERSION | u8 MsgType | compact UTF-8 JSON
    frame 1..k   one raw, C-contiguous, little-endian buffer per array

(A ROUTER socket adds the peer identity in front; `recv(router=True)` strips it.)

Why this shape rather than pickle or one serialized blob:

* **No pickle, ever.** Unpickling network bytes runs code the sender chose.
  The header is JSON (data only) and arrays are raw bytes of allow-listed
  dtypes, so a hostile or buggy peer can at worst get its message rejected.
* **Zero copy.** A 1.2M-parameter model is 4.8 MB; copying it into a blob and
  out again every step costs more than loopback networking. Large arrays go
  to ZeroMQ as-is (`copy=False`) and come back as `np.frombuffer` views.
* **Validate before touching.** `decode` checks magic, version, type, JSON
  schema, dtypes, shapes, frame count, exact sizes and limits before it makes
  a single array view, and never allocates in proportion to a size a peer
  *claims*. Checks that need run state (run, known worker, shape, finite
  values) are `validate_update` / `validate_weights`. Every failure is a
  `ProtocolError` with a reason code: the broker counts it and carries on.

Schema policy: unknown header keys are **rejected** (reason "bad-schema").
`PROTOCOL_VERSION` is the one compatibility switch; a field that a peer would
silently ignore is a field it might have needed, so a new key means a new
version and an old peer says "bad-version" instead of misbehaving. The free
form `m` (meta) dict is where extensions that are safe to ignore belong.

`w` names the worker side of the conversation: the sender of a worker's
message, the addressee of a broker message meant for one worker (ASSIGN,
SHARD, WAIT), and -1 for the broker speaking to everyone (WEIGHTS, which can
be encoded once and sent to every worker).
"""

from __future__ import annotations

import enum
import hashlib
import json
import math
import re
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import zmq

from zsgd.errors import ProtocolError  # noqa: F401  (part of the wire API)

__all__ = [  # the format; zsgd.wire.protocol adds validation and one builder per message type
    "PROTOCOL_VERSION", "MAGIC", "DTYPES", "REASONS", "ZERO_COPY_THRESHOLD", "MsgType", "Message",
    "Limits", "ProtocolError", "encode", "decode", "send", "recv", "message_nbytes",
    "set_socket_limits", "worker_identity",
]

PROTOCOL_VERSION = 1
MAGIC = b"ZS"
_PREFIX = struct.Struct("<2sBB")

#: Arrays at least this large are sent with ``copy=False``. Below it, handing a
#: buffer to ZeroMQ's I/O thread (refcounting, a free callback across threads)
#: costs more than memcpy; 64 KiB is pyzmq's own default copy threshold.
ZERO_COPY_THRESHOLD = 64 * 1024

#: Allowed array dtypes, always little-endian on the wire. float64 is left out
#: on purpose: models are float32, and a float64 array is nearly always a bug
#: that would double the traffic; convert explicitly if you mean it.
DTYPES: dict[str, np.dtype] = {
    n: np.dtype(n).newbyteorder("<")
    for n in ("float32", "float16", "int32", "int64", "uint8", "uint16", "int8")
}

#: Every reason code a ProtocolError can carry (for counters and metrics).
REASONS = frozenset({
    "frame-count", "bad-frame", "short-header", "bad-magic", "bad-version", "bad-type", "bad-json",
    "bad-schema", "bad-dtype", "bad-shape", "size-mismatch", "too-large", "bad-array",
    # validate_update / validate_weights
    "wrong-type", "wrong-run", "unknown-worker", "wrong-identity", "wrong-shape", "wrong-dtype",
    "missing-array", "non-finite", "bad-meta",
    # zsgd.wire.shm: a slot overwritten before (or while) it was read
    "shm-stale",
})

_MAX_NDIM = 32          # numpy 1.x's limit; no model array comes close
_MAX_META_DEPTH = 8     # a config dict nests 2-3 levels; deeper is abuse
_INT64 = 1 << 63
_RUN_RE = re.compile(r"[A-Za-z0-9_.:@+-]{1,128}", re.ASCII)
_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_.]{0,63}", re.ASCII)
_CODEC_RE = re.compile(r"[A-Za-z0-9_.:=,+-]{1,64}", re.ASCII)
_KEYS_REQUIRED = frozenset({"run", "w", "v", "a"})
_KEYS_ALL = _KEYS_REQUIRED | {"c", "m"}


class MsgType(enum.IntEnum):
    """Message types; the value is the byte in the header prefix."""

    HELLO = 1      # worker -> broker: join (m: hostname, pid, zsgd, capabilities)
    ASSIGN = 2     # broker -> worker: run config + shard spec (m: config)
    WEIGHTS = 3    # broker -> worker: model weights (array "w"), version v
    UPDATE = 4     # worker -> broker: gradient/delta, base version v (m: n_samples, loss)
    HEARTBEAT = 5  # both ways; any traffic also counts as liveness
    EVAL = 6       # evaluation results (m: test_loss, test_acc)
    LEAVE = 7      # either side: orderly goodbye (m: reason)
    ERROR = 8      # either side (m: message, reason)
    SHARD = 9      # broker -> worker: data shard (arrays "x" uint8, "y" int64)
    PEER = 10      # worker -> worker relayed by the broker (m: to, round)
    WAIT = 11      # broker -> worker: no weights for you yet (m: reason)
    STATE = 12     # coordinator <-> range server (--servers K): a request (m: tag, full), or the range's
                   # weights "w" [+ optimizer state "opt.NAME"] and counters in reply


@dataclass(frozen=True)
class Limits:
    """Upper bounds a receiver enforces before it looks at any array.

    The default 1 GiB total array bytes suits a worker receiving a data shard;
    a broker should use `Limits.for_model(n_params)`, so that a peer cannot
    make it hold more than a couple of model-sized buffers per message.
    """

    max_header_bytes: int = 65536
    max_array_bytes: int = 1 << 30
    max_arrays: int = 16

    @classmethod
    def for_model(cls, n_params: int, *, factor: int = 2, **kw: int) -> Limits:
        """`factor` float32 vectors + 64 KiB: factor=2 admits a gradient plus one
        more vector, or a sparse codec at full density (int32 index + float32 value)."""
        return cls(max_array_bytes=factor * 4 * int(n_params) + 65536, **kw)


DEFAULT_LIMITS = Limits()


@dataclass
class Message:
    """One protocol message, as the runtime and the simulator see it.

    `arrays` keeps insertion order (it is the frame order). After `decode`
    or `recv`, arrays are **read-only views on the received frames**: copy
    (`np.array(a)`) before mutating, and note that they may be unaligned.
    """

    type: MsgType
    run: str
    worker: int
    version: int
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    codec: str = "none"
    meta: dict[str, Any] = field(default_factory=dict)
    #: Bytes of the frames it was decoded from (None: built here). Not an init field, so ``dataclasses.replace`` (a
    #: gradient taken from shared memory) leaves it None and the copy is counted afresh.
    wire_bytes: int | None = field(default=None, init=False, compare=False, repr=False)


# header


def _json_default(obj: Any) -> Any:
    """Let numpy scalars (a loss from np.mean, an np.int64 count) into meta."""
    if isinstance(obj, np.generic):
        return obj.item()
    raise TypeError(f"{type(obj).__name__} is not allowed in a header")


def _parse_float(text: str) -> float:
    """Refuse NaN/Infinity, and "1e999", which becomes inf without parse_constant."""
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"non-finite number {text[:32]} in header")
    return value


def _unique_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # Duplicate keys are ambiguous (which one did the sender mean?): reject.
    out = dict(pairs)
    if len(out) != len(pairs):
        raise ValueError("duplicate key in header")
    return out


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _check_depth(value: Any) -> None:
    """Bound meta nesting, iteratively (no recursion a peer can exhaust)."""
    stack = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if depth > _MAX_META_DEPTH:
            raise ProtocolError("bad-schema", f"meta nested deeper than {_MAX_META_DEPTH}")
        if isinstance(item, dict):
            stack.extend((v, depth + 1) for v in item.values())
        elif isinstance(item, list):
            stack.extend((v, depth + 1) for v in item)


# Kept, not built per message as json.dumps/json.loads with options do (a new encoder or decoder and its scanner
# each call): the same bytes and the same objects, about half the cost cold. Both are stateless between calls.
_ENCODER = json.JSONEncoder(separators=(",", ":"), allow_nan=False, ensure_ascii=False, default=_json_default)
_DECODER = json.JSONDecoder(parse_constant=_parse_float, parse_float=_parse_float, object_pairs_hook=_unique_pairs)


def _header_bytes(msg: Message) -> bytes:
    """Serialize the header (no validation beyond what JSON enforces)."""
    try:
        mtype = MsgType(msg.type)
    except ValueError:
        raise ProtocolError("bad-type", f"message type {msg.type!r}") from None
    try:
        descs = [[name, np.asarray(a).dtype.name, list(np.shape(a))] for name, a in msg.arrays.items()]
        obj: dict[str, Any] = {"run": msg.run, "w": msg.worker, "v": msg.version, "a": descs}
        if msg.codec != "none":
            obj["c"] = msg.codec
        if msg.meta:
            obj["m"] = msg.meta
        text = _ENCODER.encode(obj)
        return _PREFIX.pack(MAGIC, PROTOCOL_VERSION, int(mtype)) + text.encode("utf-8")
    except (TypeError, ValueError, RecursionError, AttributeError) as e:
        raise ProtocolError("bad-json", f"cannot encode header: {e}") from None


_Desc = tuple[str, np.dtype, tuple[int, ...]]


def _parse_header(buf: memoryview, lim: Limits) -> tuple[MsgType, str, int, int, list[_Desc], str, dict]:
    """Check and parse frame 0. Returns (type, run, w, v, descriptors, codec, meta)."""
    n = buf.nbytes
    if n < _PREFIX.size:
        raise ProtocolError("short-header", f"header is {n} bytes")
    if n > lim.max_header_bytes:
        raise ProtocolError("too-large", f"header is {n} bytes > {lim.max_header_bytes}")
    magic, version, mtype = _PREFIX.unpack(buf[:_PREFIX.size])
    if magic != MAGIC:
        raise ProtocolError("bad-magic", f"magic {magic!r}")
    if version != PROTOCOL_VERSION:
        raise ProtocolError("bad-version", f"protocol {version}, expected {PROTOCOL_VERSION}")
    try:
        mtype = MsgType(mtype)
    except ValueError:
        raise ProtocolError("bad-type", f"message type {mtype}") from None
    plain = _plain_parse(buf, lim)
    if plain is not None:
        return (mtype, *plain)
    try:
        obj = _DECODER.decode(bytes(buf[_PREFIX.size:]).decode("utf-8"))
    except (ValueError, RecursionError) as e:   # JSONDecodeError, UnicodeDecodeError
        raise ProtocolError("bad-json", str(e)[:200]) from None

    if not isinstance(obj, dict):
        raise ProtocolError("bad-schema", "header is not a JSON object")
    keys = obj.keys()
    if not _KEYS_REQUIRED <= keys or not keys <= _KEYS_ALL:
        raise ProtocolError("bad-schema", f"header keys {sorted(keys)[:8]}")
    run, w, v, descs = obj["run"], obj["w"], obj["v"], obj["a"]
    codec, meta = obj.get("c", "none"), obj.get("m", {})
    if not isinstance(run, str) or not _RUN_RE.fullmatch(run):
        raise ProtocolError("bad-schema", "run id must match [A-Za-z0-9_.:@+-]{1,128}")
    if not _is_int(w) or not -1 <= w < 1 << 31:
        raise ProtocolError("bad-schema", "worker id must be an int in [-1, 2**31)")
    if not _is_int(v) or not -1 <= v < _INT64:
        raise ProtocolError("bad-schema", "version must be an int in [-1, 2**63)")
    if not isinstance(codec, str) or not _CODEC_RE.fullmatch(codec):
        raise ProtocolError("bad-schema", "codec must match [A-Za-z0-9_.:=,+-]{1,64}")
    if not isinstance(meta, dict):
        raise ProtocolError("bad-schema", "meta must be an object")
    _check_depth(meta)
    if not isinstance(descs, list):
        raise ProtocolError("bad-schema", "array descriptors must be a list")
    if len(descs) > lim.max_arrays:
        raise ProtocolError("too-large", f"{len(descs)} arrays > {lim.max_arrays}")

    parsed: list[_Desc] = []
    seen: set[str] = set()
    for d in descs:
        if not isinstance(d, list) or len(d) != 3:
            raise ProtocolError("bad-schema", "array descriptor must be [name, dtype, shape]")
        name, dname, shape = d
        if not isinstance(name, str) or not _NAME_RE.fullmatch(name) or name in seen:
            raise ProtocolError("bad-schema", f"bad or duplicate array name {str(name)[:64]!r}")
        seen.add(name)
        if not isinstance(dname, str) or dname not in DTYPES:
            raise ProtocolError("bad-dtype", f"dtype {str(dname)[:32]!r} not in {sorted(DTYPES)}")
        if not isinstance(shape, list) or len(shape) > _MAX_NDIM:
            raise ProtocolError("bad-shape", f"shape of {name!r} must be a list of <= {_MAX_NDIM} ints")
        for dim in shape:
            if not _is_int(dim) or dim < 0:
                raise ProtocolError("bad-shape", f"shape of {name!r} has {str(dim)[:32]}")
            if dim > lim.max_array_bytes:   # keeps the product below cheap
                raise ProtocolError("too-large", f"dimension {dim} of {name!r}")
        # numpy refuses shape (0, 2**30, 2**30, ...) although it holds nothing: bound
        # the product of the non-zero dimensions too, not only the byte size.
        if math.prod(d for d in shape if d) * DTYPES[dname].itemsize > lim.max_array_bytes:
            raise ProtocolError("too-large", f"shape {shape} of {name!r}")
        parsed.append((name, DTYPES[dname], tuple(shape)))
    return mtype, run, w, v, parsed, codec, meta


# encode / decode


def _wire_array(name: str, arr: Any) -> np.ndarray:
    """The array as it goes on the wire: C-contiguous little-endian, allowed dtype.

    No copy when it already is (the common case); a copy otherwise, which is
    also what makes it safe to send a strided view or a big-endian array.
    """
    if not isinstance(arr, np.ndarray):
        raise ProtocolError("bad-array", f"array {name!r} is {type(arr).__name__}, not ndarray")
    dname = arr.dtype.name
    if dname not in DTYPES or arr.dtype.fields is not None:
        raise ProtocolError("bad-dtype", f"array {name!r} has dtype {arr.dtype}; allowed {sorted(DTYPES)}")
    wire = DTYPES[dname]
    if arr.flags.c_contiguous and arr.dtype == wire:
        return arr
    return np.array(arr, dtype=wire, order="C")   # not ascontiguousarray: it turns 0-d into 1-d


def encode(msg: Message, limits: Limits | None = None, check: bool = True) -> list[bytes | memoryview]:
    """Frames for `msg` (without identity). Arrays are **not** copied.

    The returned memoryviews alias the message's arrays: while they (or a
    zero-copy send of them) are alive, do not mutate those arrays. Anything
    `encode` returns passes `decode` with the same limits; a bad message
    fails here, at the sender, with the same reason code the receiver would
    have given. A flat message (every exchange's update and reply: ids, C-contiguous
    arrays, meta of plain scalars) has its header formatted directly (``_plain_frames``),
    which admits only what the receiver's rules admit; any other header is
    JSON-encoded and re-parsed with the receiver's rules.

    ``check=False`` skips that re-parse for a header whose every field the
    sender made itself; the receiver still checks it in full; dtypes and
    sizes are checked here either way.
    """
    lim = limits or DEFAULT_LIMITS
    plain = _plain_frames(msg, lim)
    if plain is not None:
        return plain
    wire = {name: _wire_array(name, a) for name, a in msg.arrays.items()}
    header = _header_bytes(Message(msg.type, msg.run, msg.worker, msg.version,
                                   wire, msg.codec, msg.meta))
    if check:
        _parse_header(memoryview(header), lim)
    elif len(header) > lim.max_header_bytes:
        raise ProtocolError("too-large", f"header is {len(header)} bytes > {lim.max_header_bytes}")
    total = sum(a.nbytes for a in wire.values())
    if total > lim.max_array_bytes:
        raise ProtocolError("too-large", f"{total} array bytes > {lim.max_array_bytes}")
    return [header, *(memoryview(a.reshape(-1)).cast("B") for a in wire.values())]


_WIRE_NAMES = {dt: name for name, dt in DTYPES.items()}  # only a wire dtype itself (byte order included) is found
_SAFE_STR = re.compile(r"[A-Za-z0-9_.:@+-]*", re.ASCII)  # a JSON string of these needs no escaping
_JSON_CONST = {None: "null", True: "true", False: "false"}


def _plain_frames(msg: Message, lim: Limits) -> list[bytes | memoryview] | None:
    """The frames of a flat message, its header formatted directly: the very bytes ``json.dumps`` makes, without
    the JSON encoder and the re-parse, whose code and data are out of the cache when an exchange's message goes
    out (an update's encode 94 -> 30 us cold, a reply's 195 -> 20 us). Flat: an int worker and version and a
    run id in the receiver's ranges, arrays of allowed dtypes, C-contiguous, named and sized within ``lim``, meta
    of str keys and None, bool, int, finite float or plain str values, as ``_SAFE_STR``. What it accepts,
    ``_parse_header`` accepts (tests/test_protocol.py checks both); None for anything else (the general path)."""
    run, w, v, codec = msg.run, msg.worker, msg.version, msg.codec
    if (type(run) is not str or type(w) is not int or type(v) is not int or type(codec) is not str or not -1 <= w < 1 << 31
            or not -1 <= v < _INT64 or not _RUN_RE.fullmatch(run) or (codec != "none" and not _CODEC_RE.fullmatch(codec))
            or len(msg.arrays) > lim.max_arrays or type(msg.meta) is not dict):
        return None
    mtype = msg.type
    if type(mtype) is not MsgType:
        try:
            mtype = MsgType(mtype)
        except ValueError:
            return None
    descs, frames, total, most = [], [], 0, lim.max_array_bytes
    for name, a in msg.arrays.items():
        if type(name) is not str or type(a) is not np.ndarray or not _NAME_RE.fullmatch(name):
            return None
        dname, shape = _WIRE_NAMES.get(a.dtype), a.shape
        if dname is None or not a.flags.c_contiguous:
            return None
        if len(shape) == 1:
            if shape[0] > most or (shape[0] or 1) * a.itemsize > most:
                return None
            dims = str(shape[0])
        elif len(shape) > _MAX_NDIM or any(d > most for d in shape) or math.prod(d for d in shape if d) * a.itemsize > most:
            return None
        else:
            dims = ",".join(map(str, shape))
        total += a.nbytes
        descs.append('["%s","%s",[%s]]' % (name, dname, dims))
        frames.append(memoryview(a.reshape(-1)).cast("B"))
    if total > lim.max_array_bytes:
        return None
    meta = []
    for key, val in msg.meta.items() if msg.meta else ():
        t = type(val)
        if type(key) is not str or not _SAFE_STR.fullmatch(key):
            return None
        if val is None or t is bool:
            meta.append('"%s":%s' % (key, _JSON_CONST[val]))
        elif t is int or (t is float and math.isfinite(val)):
            meta.append('"%s":%r' % (key, val))
        elif t is str and _SAFE_STR.fullmatch(val):
            meta.append('"%s":"%s"' % (key, val))
        else:
            return None
    text = '{"run":"%s","w":%d,"v":%d,"a":[%s]%s%s}' % (run, w, v, ",".join(descs), "" if codec == "none" else ',"c":"%s"' % codec,
                                                      ',"m":{%s}' % ",".join(meta) if msg.meta else "")
    header = _PREFIX.pack(MAGIC, PROTOCOL_VERSION, int(mtype)) + text.encode()
    return None if len(header) > lim.max_header_bytes else [header, *frames]


# One 1-d array or none (shared memory's), no codec, meta an object or none: the exchange's update and reply. Integers as JSON writes them (no
# leading zeros); anything else, or a check below that fails, takes the general path, which gives the same result
# for whatever this accepts (the same tokens, parsed by the same rules) and the canonical error for the rest.
_PLAIN_RE = re.compile(r'\{"run":"([A-Za-z0-9_.:@+-]{1,128})","w":(-1|0|[1-9][0-9]{0,18}),"v":(-1|0|[1-9][0-9]{0,18}),'
                       r'"a":\[(?:\["([A-Za-z_][A-Za-z0-9_.]{0,63})","(%s)",\[(0|[1-9][0-9]{0,18})\]\])?\](?:,"m":(\{.*\}))?\}'
                       % "|".join(DTYPES), re.ASCII | re.DOTALL)


def _plain_parse(buf: memoryview, lim: Limits) -> tuple[str, int, int, list[_Desc], str, dict] | None:
    """``_parse_header``'s result for a header of the exchange's shape, without the general parser's many steps
    (82 -> 35 us a reply's decode, cold); None: take the general path."""
    try:
        m = _PLAIN_RE.fullmatch(bytes(buf[_PREFIX.size:]).decode("ascii"))
    except UnicodeDecodeError:
        return None
    if m is None:
        return None
    run, w, v, name, dname, dim, meta = m.groups()
    w, v, descs = int(w), int(v), []
    if w >= 1 << 31 or v >= _INT64:
        return None
    if name is not None:
        dim, dtype = int(dim), DTYPES[dname]
        if lim.max_arrays < 1 or dim > lim.max_array_bytes or (dim or 1) * dtype.itemsize > lim.max_array_bytes:
            return None
        descs.append((name, dtype, (dim,)))
    try:
        meta = {} if meta is None else _DECODER.decode(meta)
        _check_depth(meta)
    except (ValueError, RecursionError, ProtocolError):
        return None
    return run, w, v, descs, "none", meta


def _frame_buffer(frame: Any) -> memoryview:
    """A flat byte view of a received frame, without copying."""
    if isinstance(frame, zmq.Frame):
        frame = frame.buffer
    try:
        mv = frame if isinstance(frame, memoryview) else memoryview(frame)
        return mv if (mv.format == "B" and mv.ndim == 1) else mv.cast("B")
    except (TypeError, ValueError) as e:
        raise ProtocolError("bad-frame", f"frame is not a contiguous buffer: {e}") from None


def decode(frames: Sequence[bytes | zmq.Frame | memoryview], limits: Limits | None = None) -> Message:
    """Parse and check frames (identity already removed) into a `Message`.

    Raises `ProtocolError` on anything malformed; never another exception.
    All structural checks run before any array view exists, and nothing is
    allocated in proportion to sizes the sender claims.

    The returned arrays are read-only `np.frombuffer` views on `frames`
    (zero copy): the consumer must copy before mutating, and should copy
    before keeping them long (a view keeps the whole frame alive). They may
    be unaligned, which numpy and numba handle, slightly slower.
    """
    lim = limits or DEFAULT_LIMITS
    if not isinstance(frames, Sequence) or isinstance(frames, (bytes, bytearray, str, memoryview)):
        raise ProtocolError("bad-frame", f"frames must be a sequence of frames, not {type(frames).__name__}")
    n = len(frames)
    if n < 1 or n > 1 + lim.max_arrays:
        raise ProtocolError("frame-count", f"{n} frames")
    bufs = [_frame_buffer(frames[i]) for i in range(n)]
    mtype, run, w, v, descs, codec, meta = _parse_header(bufs[0], lim)
    if len(descs) != n - 1:
        raise ProtocolError("frame-count", f"{len(descs)} arrays declared, {n - 1} frames")
    total = 0
    for (name, dtype, shape), buf in zip(descs, bufs[1:]):
        size = math.prod(shape) * dtype.itemsize
        total += size
        if total > lim.max_array_bytes:
            raise ProtocolError("too-large", f"arrays exceed {lim.max_array_bytes} bytes at {name!r}")
        if size != buf.nbytes:
            raise ProtocolError("size-mismatch", f"{name!r} declares {size} bytes, frame has {buf.nbytes}")
    arrays: dict[str, np.ndarray] = {}
    for (name, dtype, shape), buf in zip(descs, bufs[1:]):
        arr = np.frombuffer(buf, dtype=dtype).reshape(shape)
        arr.flags.writeable = False
        arrays[name] = arr
    msg = Message(mtype, run, w, v, arrays, codec, meta)
    msg.wire_bytes = bufs[0].nbytes + total
    return msg


def message_nbytes(msg: Message, *, framing: bool = False) -> int:
    """Exact bytes of header + array frames, i.e. what `send` returns.

    With `framing=True`, add ZMTP 3 frame headers (1 flag byte + 1 or 8 size
    bytes per frame) for a closer estimate of bytes on the link; TCP/IP
    overhead and a ROUTER identity frame are never included.
    """
    if msg.wire_bytes is not None and not framing:
        return msg.wire_bytes  # decoded: what came in (a server counts every update; re-encoding its header cost 7-180 us)
    sizes = [len(_header_bytes(msg))] + [int(np.asarray(a).nbytes) for a in msg.arrays.values()]
    return sum(s + (2 if s < 256 else 9) * framing for s in sizes)


# sockets


def send(sock: zmq.Socket, msg: Message, identity: bytes | None = None, flags: int = 0,
         limits: Limits | None = None) -> int:
    """Encode and send `msg`; returns header + array bytes (== message_nbytes).

    Arrays of `ZERO_COPY_THRESHOLD` bytes or more go out with `copy=False`:
    ZeroMQ's I/O thread reads them *after* this returns, so never mutate a
    buffer that may still be in flight (send a snapshot of the weights, or
    double-buffer). With `zmq.NOBLOCK`, `zmq.Again` can only come from the
    first frame; ZeroMQ queues the rest of a multipart message atomically.
    """
    frames = encode(msg, limits)
    parts: list[bytes | memoryview] = ([identity] if identity is not None else []) + frames
    last = len(parts) - 1
    for i, part in enumerate(parts):
        more = zmq.SNDMORE if i < last else 0
        sock.send(part, flags | more, copy=len(part) < ZERO_COPY_THRESHOLD)
    return sum(len(f) for f in frames)


def recv(sock: zmq.Socket, limits: Limits | None = None, router: bool = False,
         flags: int = 0) -> tuple[bytes | None, Message]:
    """Receive one message; returns (identity or None, Message).

    `router=True`: the first frame is the peer identity (ROUTER sockets).
    Frames are received with `copy=False` and arrays are read-only views on
    them (see `decode`). A message with too many frames is drained and
    dropped frame by frame, so it cannot make us hold more than the limits
    allow. A ProtocolError carries the sender's `identity` when known. Use
    `flags=zmq.NOBLOCK` or a poller: this call itself waits as long as the
    socket's RCVTIMEO (then zmq.Again, like any timeout).
    """
    lim = limits or DEFAULT_LIMITS
    keep = lim.max_arrays + 1 + (1 if router else 0)
    first = sock.recv(flags, copy=False)
    parts = [first]
    more, dropped = first.more, 0
    while more:   # remaining parts of a multipart message are already here
        frame = sock.recv(copy=False)
        more = frame.more
        if len(parts) < keep:
            parts.append(frame)
        else:
            dropped += 1
    identity = parts.pop(0).bytes if router else None
    if dropped:
        raise ProtocolError("frame-count", f"{len(parts) + dropped} frames", identity)
    try:
        return identity, decode(parts, lim)
    except ProtocolError as e:
        e.identity = identity
        raise


def set_socket_limits(sock: zmq.Socket, limits: Limits | None = None) -> None:
    """Make libzmq drop (and disconnect) peers that send an oversized frame.

    ZMQ_MAXMSGSIZE applies per frame and is checked while reading, so an
    oversized frame is never buffered whole. Set it before bind/connect.
    """
    lim = limits or DEFAULT_LIMITS
    sock.setsockopt(zmq.MAXMSGSIZE, max(lim.max_header_bytes, lim.max_array_bytes))


def worker_identity(run: str, worker: int) -> bytes:
    """Stable ROUTER identity for a worker: set it on the DEALER before connect.

    A restarted worker gets the same identity, so the broker routes replies
    to it without a new HELLO mapping. The broker's ROUTER needs
    ``ROUTER_HANDOVER=1``, or libzmq refuses a new connection whose identity
    the dead worker's not-yet-timed-out connection still holds. The run id is
    hashed so the identity stays short (ZeroMQ allows 255 bytes) and a
    straggler from an older run cannot take over a live worker's route.
    """
    if not _is_int(worker) or worker < 0:
        raise ValueError(f"worker id must be a non-negative int, got {worker!r}")
    digest = hashlib.blake2b(run.encode("utf-8"), digest_size=6).hexdigest()
    return f"zsgd-{digest}-w{worker}".encode("ascii")
