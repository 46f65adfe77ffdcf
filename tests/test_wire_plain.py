"""The exchange's headers go through short paths (``frames._plain_frames`` to encode, ``frames._plain_parse`` to
decode); these check that the short paths change nothing a peer can see: the same bytes as the JSON encoder, the
same parsed header as the general parser, the same errors, and no message the receiver would refuse."""

from __future__ import annotations

import random

import numpy as np
import pytest

from zsgd.errors import ProtocolError
from zsgd.wire import frames as F
from zsgd.wire import protocol as P

_VALUES = [None, True, False, 0, -5, 2**40, 0.5, -1e-300, 1e300, float("nan"), float("inf"), "abc", "a b", "é", "", [1], {"x": 1},
           np.float32(1.5), np.int64(3)]
_KEYS = ["n_samples", "loss", "", "a b", "seq", "x.y", 1]


def _general(buf: bytes, lim: F.Limits, monkeypatch: pytest.MonkeyPatch):
    """``_parse_header`` without its short path: the result, or ("error", reason)."""
    with monkeypatch.context() as m:
        m.setattr(F, "_plain_parse", lambda b, l: None)
        try:
            return F._parse_header(memoryview(buf), lim)
        except ProtocolError as e:
            return ("error", e.reason)


def _either(buf: bytes, lim: F.Limits):
    try:
        return F._parse_header(memoryview(buf), lim)
    except ProtocolError as e:
        return ("error", e.reason)


def _random_message(rng: random.Random) -> F.Message:
    arrays = {}
    for j in range(rng.choice([0, 1, 1, 1, 2])):
        a = np.zeros(rng.choice([(5,), (0,), (3, 4), (), (2, 0, 3)]), rng.choice(["float32", "float16", "int64", "uint8", "float64"]))
        if rng.random() < 0.1 and a.ndim == 1 and a.size > 2:
            a = a[::2]  # not contiguous
        arrays[rng.choice(["g", "w", "x", "9bad", "opt.m", f"g{j}"])] = a
    meta = {rng.choice(_KEYS): rng.choice(_VALUES) for _ in range(rng.choice([0, 0, 1, 2, 3]))}
    return F.Message(rng.choice([3, 4, 1, 99]), rng.choice(["run1", "bad run", "x" * 128, "x" * 129, "a.b:c@d+e-f_9"]),
                     rng.choice([-1, 0, 5, 2**31, -2, np.int64(3)]), rng.choice([-1, 0, 17, 2**63, 2**63 - 1]), arrays,
                     rng.choice(["none", "none", "topk:0.1", "bad codec!"]), meta)


def test_a_flat_header_is_the_json_encoders_bytes_and_only_what_the_receiver_accepts(monkeypatch):
    rng = random.Random(1)
    limits = [F.DEFAULT_LIMITS, F.Limits(max_array_bytes=10), F.Limits(max_header_bytes=60), F.Limits(max_arrays=1)]
    plain = 0
    for _ in range(3000):
        msg, lim = _random_message(rng), rng.choice(limits)
        frames = F._plain_frames(msg, lim)
        try:  # the general path: JSON-encoded, re-parsed with the receiver's rules, sizes checked
            wire = {n: F._wire_array(n, a) for n, a in msg.arrays.items()}
            ref = F._header_bytes(F.Message(msg.type, msg.run, msg.worker, msg.version, wire, msg.codec, msg.meta))
            F._parse_header(memoryview(ref), lim)
            ref = ref if sum(a.nbytes for a in wire.values()) <= lim.max_array_bytes else None
        except ProtocolError:
            ref = None
        if frames is not None:
            plain += 1
            assert ref is not None and frames[0] == ref, msg
            assert [bytes(f) for f in frames[1:]] == [bytes(F._wire_array(n, a).reshape(-1)) for n, a in msg.arrays.items()]
        if ref is not None:
            assert _either(ref, lim) == _general(ref, lim, monkeypatch)
    assert plain > 50  # the random messages reach the short path (73 of 3,000 with this seed)


def test_a_mangled_header_parses_as_the_general_parser_says(monkeypatch):
    """Bytes changed, dropped or added anywhere in an exchange's header: the same result or the same reason."""
    rng = random.Random(2)
    bases = [F.encode(P.update_message("run1", 3, 7, np.zeros(10, np.float32), 64, 0.5, seq=4))[0],
             F.encode(P.update_message("run1", 3, 7, None, 64, 0.5, shm=12))[0],  # through shared memory: no array
             F.encode(P.weights_message("run1", 8, np.zeros(10, np.float32)))[0]]
    accepted = 0
    for _ in range(6000):
        b = bytearray(rng.choice(bases))
        for _ in range(rng.choice([1, 2, 3])):
            k = rng.randrange(4, len(b))
            if rng.random() < 0.5:
                b[k] = rng.choice(b'{}[]":,0123456789-.eE ab\\\xff')
            elif rng.random() < 0.5:
                del b[k]
            else:
                b.insert(k, rng.choice(b'{}[]":,0123456789-.eE ab'))
        lim = rng.choice([F.DEFAULT_LIMITS, F.Limits(max_array_bytes=10), F.Limits(max_arrays=0)])
        got = _either(bytes(b), lim)
        assert got == _general(bytes(b), lim, monkeypatch), bytes(b)
        accepted += got[0] != "error"
    assert accepted > 50


def test_the_exchanges_messages_take_the_short_paths(monkeypatch):
    """An update (flat meta) and the reply are encoded without the JSON encoder and parsed without the general
    parser; a message with nested meta takes the general path both ways, and decodes the same."""
    g = np.arange(100, dtype=np.float32)
    update = P.update_message("0123456789ab", 2, 41, g, 64, 0.25, compute_s=0.0123, seq=9)
    reply = P.weights_message("0123456789ab", 42, g)
    encoded = [bytes(f) for f in F.encode(update)], [bytes(f) for f in F.encode(reply)]
    for header in (encoded[0][0], encoded[1][0]):
        assert F._plain_parse(memoryview(header), F.DEFAULT_LIMITS) is not None
    monkeypatch.setattr(F, "_header_bytes", lambda m: pytest.fail("JSON-encoded"))
    assert [bytes(f) for f in F.encode(update)] == encoded[0]
    assert [bytes(f) for f in F.encode(reply, check=False)] == encoded[1]
    monkeypatch.undo()
    back = P.decode(encoded[0])
    assert back.meta == {"n_samples": 64, "loss": 0.25, "compute_s": 0.0123, "seq": 9} and back.worker == 2 and back.version == 41
    assert np.array_equal(back.arrays["g"], g) and not back.arrays["g"].flags.writeable
    nested = P.weights_message("0123456789ab", 42, g, hop=[1.5, 2.5])
    assert F._plain_frames(nested, F.DEFAULT_LIMITS) is None
    header = bytes(P.encode(nested)[0])
    assert F._plain_parse(memoryview(header), F.DEFAULT_LIMITS) is not None  # any JSON object as meta: still short
    assert P.decode(P.encode(nested)).meta == {"hop": [1.5, 2.5]}
