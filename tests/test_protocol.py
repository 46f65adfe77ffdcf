"""Wire protocol: round trips over real ZeroMQ sockets, zero copy, and fuzzing.

Every socket lives in a per-test context destroyed with linger=0, and every
receive has a timeout, so a failing test cannot hang or leak ports.
"""

from __future__ import annotations

import json
import struct
import tracemalloc

import numpy as np
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from zsgd.wire import protocol as P
from zsgd.wire.protocol import Limits, Message, MsgType, ProtocolError

RUN = "run-1"
BIG = 1_200_000  # float32 elements: 4.8 MB, the size of a mid-sized model
FUZZ = settings(max_examples=250, deadline=1000, suppress_health_check=[HealthCheck.too_slow])


# ----------------------------------------------------------------- fixtures


@pytest.fixture
def ctx():
    c = zmq.Context()
    yield c
    c.destroy(linger=0)


def _sock(ctx: zmq.Context, kind: int) -> zmq.Socket:
    s = ctx.socket(kind)
    s.linger = 0
    s.rcvtimeo = 5000
    s.sndtimeo = 5000
    return s


@pytest.fixture
def pair(ctx):
    """A connected inproc PAIR: (sender, receiver)."""
    a, b = _sock(ctx, zmq.PAIR), _sock(ctx, zmq.PAIR)
    b.bind("inproc://protocol-test")
    a.connect("inproc://protocol-test")
    return a, b


@pytest.fixture
def dealer_router(ctx):
    """A worker DEALER with a stable identity connected to a ROUTER over tcp loopback."""
    router = _sock(ctx, zmq.ROUTER)
    P.set_socket_limits(router, Limits.for_model(BIG))
    port = router.bind_to_random_port("tcp://127.0.0.1")
    dealer = _sock(ctx, zmq.DEALER)
    dealer.setsockopt(zmq.IDENTITY, P.worker_identity(RUN, 3))
    dealer.connect(f"tcp://127.0.0.1:{port}")
    return dealer, router


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def _arrays_equal(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert list(a) == list(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        np.testing.assert_array_equal(a[k], b[k])


def _assert_same(got: Message, want: Message) -> None:
    assert (got.type, got.run, got.worker, got.version, got.codec) == (
        want.type, want.run, want.worker, want.version, want.codec)
    assert got.meta == json.loads(json.dumps(want.meta))  # tuples come back as lists
    _arrays_equal(got.arrays, want.arrays)


def _all_messages() -> list[Message]:
    r = _rng()
    w = r.standard_normal(BIG).astype(np.float32)
    return [
        P.hello(RUN, 3, capabilities=["numba", "shard"]),
        P.assign(RUN, 3, {"algo": "async", "lr": 0.05, "batch": 32, "layers": [784, 128, 10]}),
        P.weights_message(RUN, 7, w),
        P.update_message(RUN, 3, 7, r.standard_normal(1000).astype(np.float32), 32, 2.3),
        P.update_message(RUN, 3, 7, None, 32, None, codec="topk:0.01",
                         extra_arrays={"idx": np.arange(10, dtype=np.int32),
                                       "val": r.standard_normal(10).astype(np.float16)}),
        P.heartbeat(RUN, -1, 5),
        P.eval_message(RUN, 0, 9, 0.31, 0.91),
        P.leave(RUN, 3, "finished"),
        P.error_message(RUN, -1, "bad update", reason="non-finite"),
        P.shard_message(RUN, 3, r.integers(0, 255, (50, 28, 28), dtype=np.uint8),
                        r.integers(0, 10, 50).astype(np.int64)),
        P.peer_message(RUN, 2, to=3, round=4, arrays={
            "w": np.zeros(0, np.float32), "s": np.zeros((0, 5), np.int8),
            "u": np.arange(12, dtype=np.uint16).reshape(3, 4), "k": np.full((), 7, np.int64)}),
        P.wait_message(RUN, 3, 7, "ssp"),
        P.state_request(RUN, 5, full=True),
        P.state_message(RUN, 1, 7, {"w": w[:100], "opt.m": w[100:200], "opt.step": np.array(3, np.int64)}, tag=5),
    ]


# ----------------------------------------------------------------- round trips


def test_every_type_is_covered():
    assert {m.type for m in _all_messages()} == set(MsgType)


@pytest.mark.parametrize("msg", _all_messages(), ids=lambda m: m.type.name)
def test_roundtrip_over_socket(pair, msg):
    a, b = pair
    sent = P.send(a, msg)
    assert sent == P.message_nbytes(msg)
    ident, got = P.recv(b)
    assert ident is None
    _assert_same(got, msg)


@pytest.mark.parametrize("dtype", sorted(P.DTYPES))
@pytest.mark.parametrize("shape", [(), (0,), (1,), (5, 0, 3), (7, 3), (2, 3, 4, 5)])
def test_roundtrip_in_memory_dtypes_shapes(dtype, shape):
    arr = (np.arange(int(np.prod(shape))) % 100).astype(dtype).reshape(shape)
    msg = Message(MsgType.PEER, RUN, 1, 2, {"x": arr, "y": arr.copy()}, meta={"to": 0})
    frames = P.encode(msg)
    assert len(frames) == 3 and sum(len(f) for f in frames) == P.message_nbytes(msg)
    _assert_same(P.decode(frames), msg)


def test_encode_normalizes_layout_and_refuses_bad_dtypes():
    base = np.arange(12, dtype=np.float32).reshape(3, 4)
    for arr in (base.T, base.astype(">f4"), base[:, ::2]):
        got = P.decode(P.encode(Message(MsgType.WEIGHTS, RUN, -1, 0, {"w": arr}))).arrays["w"]
        assert got.dtype == np.dtype("<f4")
        np.testing.assert_array_equal(got, arr)
    for bad in (base.astype(np.float64), base.astype(bool), [1.0, 2.0]):
        with pytest.raises(ProtocolError) as e:
            P.encode(Message(MsgType.WEIGHTS, RUN, -1, 0, {"w": bad}))
        assert e.value.reason in ("bad-dtype", "bad-array")
    with pytest.raises(ProtocolError, match="bad-json"):  # JSON has no NaN: the frame layer refuses it
        P.encode(Message(MsgType.UPDATE, RUN, 0, 0, {"g": base.ravel()}, meta={"n_samples": 1, "loss": float("nan")}))
    # ... so the builder carries a worker's blown-up loss as null plus a flag (a worker never crashes on NaN)
    sent = P.decode(P.encode(P.update_message(RUN, 0, 0, base.ravel(), 1, float("nan"))))
    assert sent.meta["loss"] is None and sent.meta["non_finite"] is True
    with pytest.raises(ProtocolError, match="bad-schema"):
        P.encode(Message(MsgType.HEARTBEAT, "run id with spaces", 0, 0))
    with pytest.raises(ProtocolError, match="bad-type"):
        P.encode(Message(99, RUN, 0, 0))  # type: ignore[arg-type]
    with pytest.raises(ProtocolError, match="too-large"):
        P.encode(P.weights_message(RUN, 0, base.ravel()), Limits(max_array_bytes=16))


def test_numpy_scalars_in_meta_are_accepted():
    msg = P.update_message(RUN, 0, 0, np.zeros(3, np.float32), np.int64(5), np.float32(1.5),
                           lr=np.float64(0.1))
    assert P.decode(P.encode(msg)).meta == {"n_samples": 5, "loss": 1.5, "lr": 0.1}


def test_message_nbytes_framing():
    msg = P.weights_message(RUN, 1, np.zeros(1000, np.float32))
    header = len(P.encode(msg)[0])
    assert P.message_nbytes(msg) == header + 4000
    assert P.message_nbytes(msg, framing=True) == header + 4000 + 2 + 9


# ----------------------------------------------------------------- zero copy


def test_encode_does_not_copy():
    w = np.arange(BIG, dtype=np.float32)
    frames = P.encode(P.weights_message(RUN, 0, w))
    assert np.shares_memory(np.frombuffer(frames[1], np.float32), w)


def test_recv_is_zero_copy_and_read_only(pair):
    a, b = pair
    w = _rng().standard_normal(BIG).astype(np.float32)
    P.send(a, P.weights_message(RUN, 1, w))
    parts = b.recv_multipart(copy=False)
    msg = P.decode(parts)
    got = msg.arrays["w"]
    frame_view = np.frombuffer(parts[1].buffer, np.uint8)
    assert got.ctypes.data == frame_view.ctypes.data
    assert np.shares_memory(got, frame_view)
    assert not got.flags.writeable
    with pytest.raises(ValueError):
        got[0] = 1.0
    np.testing.assert_array_equal(got, w)


def test_decoded_views_of_writable_buffers_are_read_only():
    frames = [bytearray(f) for f in P.encode(P.weights_message(RUN, 0, np.ones(4, np.float32)))]
    got = P.decode(frames).arrays["w"]
    assert not got.flags.writeable


# ----------------------------------------------------------------- DEALER <-> ROUTER


def test_dealer_router_tcp_both_ways(dealer_router):
    dealer, router = dealer_router
    r = _rng(1)
    grad = r.standard_normal(BIG).astype(np.float32)
    up = P.update_message(RUN, 3, 0, grad, 64, 1.25)
    assert P.send(dealer, up) == P.message_nbytes(up)
    ident, got = P.recv(router, Limits.for_model(BIG), router=True)
    assert ident == P.worker_identity(RUN, 3)
    P.validate_update(got, run=RUN, known_workers={3}, n_params=BIG, identity=ident)
    _assert_same(got, up)

    w = r.standard_normal(BIG).astype(np.float32)
    reply = P.weights_message(RUN, 1, w)
    assert P.send(router, reply, identity=ident) == P.message_nbytes(reply)
    none, back = P.recv(dealer)
    assert none is None
    P.validate_weights(back, run=RUN, n_params=BIG)
    _assert_same(back, reply)


def test_router_reports_identity_of_bad_sender(dealer_router):
    dealer, router = dealer_router
    dealer.send_multipart([b"not a zsgd header"])
    with pytest.raises(ProtocolError) as e:
        P.recv(router, router=True)
    assert e.value.reason == "bad-magic"
    assert e.value.identity == P.worker_identity(RUN, 3)
    # the socket is still usable after a reject
    P.send(dealer, P.heartbeat(RUN, 3))
    assert P.recv(router, router=True)[1].type == MsgType.HEARTBEAT


def test_recv_drains_and_rejects_too_many_frames(pair):
    a, b = pair
    a.send_multipart([b"x"] * 100)
    with pytest.raises(ProtocolError, match="frame-count"):
        P.recv(b, Limits(max_arrays=2))
    P.send(a, P.heartbeat(RUN, 1))  # the next message is intact
    assert P.recv(b)[1].worker == 1


def test_restarted_worker_keeps_its_route(ctx):
    """A worker that dies and comes back with the same identity gets the replies."""
    router = _sock(ctx, zmq.ROUTER)
    router.setsockopt(zmq.ROUTER_HANDOVER, 1)
    router.setsockopt(zmq.ROUTER_MANDATORY, 1)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    ident = P.worker_identity(RUN, 5)
    old = _sock(ctx, zmq.DEALER)
    old.setsockopt(zmq.IDENTITY, ident)
    old.connect(f"tcp://127.0.0.1:{port}")
    P.send(old, P.hello(RUN, 5))
    assert P.recv(router, router=True)[0] == ident
    new = _sock(ctx, zmq.DEALER)  # the old one is left dangling, as after a crash
    new.setsockopt(zmq.IDENTITY, ident)
    new.connect(f"tcp://127.0.0.1:{port}")
    P.send(new, P.hello(RUN, 5))
    got_ident, got = P.recv(router, router=True)
    assert got_ident == ident and got.meta["pid"] > 0
    P.send(router, P.assign(RUN, 5, {"lr": 0.1}), identity=ident)
    assert P.recv(new)[1].type == MsgType.ASSIGN


def test_worker_identity_is_stable_and_short():
    ident = P.worker_identity("x" * 500, 12345)
    assert ident == P.worker_identity("x" * 500, 12345) and len(ident) < 64 and ident[0] != 0
    assert P.worker_identity(RUN, 1) != P.worker_identity(RUN, 2)
    assert P.worker_identity("a", 1) != P.worker_identity("b", 1)
    with pytest.raises(ValueError):
        P.worker_identity(RUN, -1)


# ----------------------------------------------------------------- rejects


def _header(mtype: int = MsgType.UPDATE, version: int = P.PROTOCOL_VERSION, **obj) -> bytes:
    body = {"run": RUN, "w": 0, "v": 0, "a": []}
    body.update(obj)
    return struct.pack("<2sBB", b"ZS", version, mtype) + json.dumps(body).encode()


@pytest.mark.parametrize("frames, reason", [
    ([], "frame-count"),
    ([b"ZS"], "short-header"),
    ([b"ZZ\x01\x05{}"], "bad-magic"),
    ([_header(version=2)], "bad-version"),
    ([_header(mtype=0)], "bad-type"),
    ([_header(mtype=200)], "bad-type"),
    ([b"ZS\x01\x05{"], "bad-json"),
    ([b"ZS\x01\x05\xff\xfe"], "bad-json"),
    ([b"ZS\x01\x05" + b'{"run":"r","w":0,"v":0,"a":[],"m":{"x":NaN}}'], "bad-json"),
    ([b"ZS\x01\x05" + b'{"run":"r","w":0,"v":0,"a":[],"m":{"x":1e999}}'], "bad-json"),
    ([b"ZS\x01\x05" + b'{"run":"r","run":"s","w":0,"v":0,"a":[]}'], "bad-json"),
    ([b"ZS\x01\x05" + b'{"run":"r","w":0,"v":0,"a":[],"m":{"x":' + b"9" * 5000 + b"}}"], "bad-json"),
    ([b"ZS\x01\x05" + b"[" * 20000 + b"]" * 20000], "bad-json"),
    ([b"ZS\x01\x05[]"], "bad-schema"),
    ([_header(extra=1)], "bad-schema"),
    ([_header(w=True)], "bad-schema"),
    ([_header(w=-2)], "bad-schema"),
    ([_header(v=1.5)], "bad-schema"),
    ([_header(run="")], "bad-schema"),
    ([_header(c=3)], "bad-schema"),
    ([_header(m=[1])], "bad-schema"),
    ([_header(m={"a": [[[[[[[[[[1]]]]]]]]]]})], "bad-schema"),
    ([_header(a=[["g", "float32"]]), b""], "bad-schema"),
    ([_header(a=[["g", "float32", [1]], ["g", "float32", [1]]]), b"abcd", b"abcd"], "bad-schema"),
    ([_header(a=[["g", "float64", [1]]]), b"12345678"], "bad-dtype"),
    ([_header(a=[["g", "object", [1]]]), b"12345678"], "bad-dtype"),
    ([_header(a=[["g", "float32", [-1]]]), b""], "bad-shape"),
    ([_header(a=[["g", "float32", [1.0]]]), b"abcd"], "bad-shape"),
    ([_header(a=[["g", "float32", [1] * 40]]), b"abcd"], "bad-shape"),
    ([_header(a=[["g", "float32", [2**62, 2**62]]]), b"abcd"], "too-large"),
    ([_header(a=[["g", "float32", [0, 2**62]]]), b""], "too-large"),
    ([_header(a=[["g", "float32", [0, 2**20, 2**20, 2**20]]]), b""], "too-large"),
    ([_header(a=[["g", "float32", [3]]]), b"abcd"], "size-mismatch"),
    ([_header(a=[["g", "float32", [1]]])], "frame-count"),
    ([_header(), b"extra"], "frame-count"),
    ([_header(), "text"], "bad-frame"),
    ([_header(), 12], "bad-frame"),
])
def test_decode_rejects(frames, reason):
    with pytest.raises(ProtocolError) as e:
        P.decode(frames)
    assert e.value.reason == reason, e.value
    assert e.value.reason in P.REASONS


def test_limits_are_enforced():
    msg = P.weights_message(RUN, 0, np.zeros(1000, np.float32), note="x" * 100)
    frames = P.encode(msg)
    with pytest.raises(ProtocolError, match="too-large"):
        P.decode(frames, Limits(max_array_bytes=3999))
    with pytest.raises(ProtocolError, match="too-large"):
        P.decode(frames, Limits(max_header_bytes=64))
    with pytest.raises(ProtocolError, match="frame-count"):
        P.decode([frames[0]] + [b""] * 20, Limits(max_arrays=16))
    assert Limits.for_model(1000).max_array_bytes == 8000 + 65536


def test_huge_claims_allocate_nothing():
    """A header claiming a terabyte must be refused without allocating for it."""
    hdr = _header(a=[["g", "float32", [1 << 28, 1 << 10]]])
    tracemalloc.start()
    try:
        for _ in range(50):
            with pytest.raises(ProtocolError):
                P.decode([hdr, b"abcd"], Limits(max_array_bytes=1 << 62))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20


# ----------------------------------------------------------------- validate_update


def _good_update(**kw) -> Message:
    args = dict(run=RUN, worker=2, base_version=5, grad=np.ones(10, np.float32), n_samples=8, loss=0.5)
    args.update(kw)
    return P.decode(P.encode(P.update_message(**args)))


def test_validate_update_accepts_good_one():
    P.validate_update(_good_update(), run=RUN, known_workers={1, 2}, n_params=10)


@pytest.mark.parametrize("msg, kw, reason", [
    (lambda: P.decode(P.encode(P.heartbeat(RUN, 2))), {}, "wrong-type"),
    (lambda: _good_update(), {"run": "other"}, "wrong-run"),
    (lambda: _good_update(worker=9), {}, "unknown-worker"),
    (lambda: _good_update(), {"identity": P.worker_identity(RUN, 1)}, "wrong-identity"),
    (lambda: _good_update(grad=np.ones(11, np.float32)), {}, "wrong-shape"),
    (lambda: _good_update(grad=np.ones((2, 5), np.float32)), {}, "wrong-shape"),
    (lambda: _good_update(grad=np.ones(10, np.float16)), {}, "wrong-dtype"),
    (lambda: _good_update(grad=None, extra_arrays={"x": np.ones(10, np.float32)}), {}, "missing-array"),
    (lambda: _good_update(grad=None, codec="topk", extra_arrays={"v": np.ones(11, np.float32)}), {},
     "wrong-shape"),
    (lambda: _good_update(grad=np.array([0] * 9 + [np.nan], np.float32)), {}, "non-finite"),
    (lambda: _good_update(grad=np.array([np.inf] + [0] * 9, np.float32)), {}, "non-finite"),
    (lambda: _good_update(grad=None, codec="q8", extra_arrays={"s": np.array([np.nan], np.float16)}), {},
     "non-finite"),
    (lambda: _good_update(n_samples=-1), {}, "bad-meta"),
    (lambda: P.decode(P.encode(Message(MsgType.UPDATE, RUN, 2, 0, {"g": np.ones(10, np.float32)},
                                       meta={"loss": 1.0}))), {}, "bad-meta"),
])
def test_validate_update_rejects(msg, kw, reason):
    args = dict(run=RUN, known_workers={1, 2}, n_params=10)
    args.update(kw)
    with pytest.raises(ProtocolError) as e:
        P.validate_update(msg(), **args)
    assert e.value.reason == reason


def test_validate_update_checks_loss_of_unencoded_messages():
    """The simulator hands Messages over without JSON, so a NaN loss can reach validation."""
    msg = Message(MsgType.UPDATE, RUN, 2, 0, {"g": np.zeros(10, np.float32)}, meta={"n_samples": 4, "loss": float("nan")})
    with pytest.raises(ProtocolError, match="non-finite"):
        P.validate_update(msg, run=RUN, known_workers={2}, n_params=10)


def test_validate_update_can_skip_finiteness():
    msg = _good_update(grad=np.full(10, np.nan, np.float32))
    P.validate_update(msg, run=RUN, known_workers={2}, n_params=10, require_finite=False)


@given(st.integers(0, 999), st.sampled_from([np.nan, np.inf, -np.inf]))
@settings(max_examples=100, deadline=1000)
def test_validate_update_finds_any_non_finite(pos, bad):
    g = np.zeros(1000, np.float32)
    g[pos] = bad
    with pytest.raises(ProtocolError, match="non-finite"):
        P.validate_update(_good_update(grad=g), run=RUN, known_workers={2}, n_params=1000)


def test_validate_weights():
    msg = P.decode(P.encode(P.weights_message(RUN, 3, np.zeros(10, np.float32))))
    P.validate_weights(msg, run=RUN, n_params=10)
    for kw, reason in [({"run": "x", "n_params": 10}, "wrong-run"),
                       ({"run": RUN, "n_params": 9}, "wrong-shape")]:
        with pytest.raises(ProtocolError, match=reason):
            P.validate_weights(msg, **kw)


# ----------------------------------------------------------------- fuzzing


def _decode_or_reject(frames, limits=None) -> Message | None:
    """The property: decode returns a Message or raises ProtocolError; nothing else."""
    try:
        return P.decode(frames, limits)
    except ProtocolError as e:
        assert e.reason in P.REASONS
        return None


_frames = st.lists(st.binary(max_size=300), max_size=6)
_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda kids: st.lists(kids, max_size=5) | st.dictionaries(st.text(max_size=8), kids, max_size=5),
    max_leaves=30,
)


@FUZZ
@given(_frames)
def test_fuzz_arbitrary_bytes(frames):
    _decode_or_reject(frames)


@FUZZ
@given(st.integers(0, 255), st.binary(max_size=400), _frames)
def test_fuzz_valid_prefix_random_body(mtype, body, rest):
    _decode_or_reject([struct.pack("<2sBB", b"ZS", P.PROTOCOL_VERSION, mtype) + body, *rest])


@FUZZ
@given(st.sampled_from(list(MsgType)), _json, _frames)
def test_fuzz_random_json(mtype, obj, rest):
    hdr = struct.pack("<2sBB", b"ZS", P.PROTOCOL_VERSION, mtype) + json.dumps(obj).encode()
    _decode_or_reject([hdr, *rest])


@FUZZ
@given(st.sampled_from(["run", "w", "v", "a", "c", "m"]), _json, st.integers(0, 2))
def test_fuzz_header_fields(key, value, which):
    """Replace one header field, or one descriptor part, with random JSON."""
    good = [_header(a=[["g", "float32", [2, 3]]]), np.zeros(6, np.float32).tobytes()]
    body = json.loads(good[0][4:])
    if key == "a":
        body["a"][0][which] = value
    else:
        body[key] = value
    got = _decode_or_reject([good[0][:4] + json.dumps(body).encode(), good[1]])
    if got is not None:
        assert got.arrays["g"].shape == (2, 3)


@FUZZ
@given(st.lists(st.integers(-2, 4) | st.integers(0, 2**70) | st.just(0), max_size=40),
       st.sampled_from(sorted(P.DTYPES)), st.integers(0, 64),
       st.sampled_from([None, Limits(max_array_bytes=1 << 62)]))
def test_fuzz_shapes(shape, dtype, nbytes, limits):
    got = _decode_or_reject([_header(a=[["g", dtype, shape]]), bytes(nbytes)], limits)
    if got is not None:
        assert got.arrays["g"].shape == tuple(shape) and got.arrays["g"].nbytes == nbytes


_SHAPES = [([2**64], "too-large"), ([2**31, 2**31], "too-large"), ([10**30], "too-large"),
           ([-3], "bad-shape"), ([1e9], "bad-shape"), ([True], "bad-shape"), ("7", "bad-shape")]
_MUTATIONS = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 10**6), st.integers(1, 255)),
    st.tuples(st.just("truncate"), st.integers(0, 10**6), st.just(0)),
    st.tuples(st.just("drop"), st.integers(0, 10), st.just(0)),
    st.tuples(st.just("add"), st.integers(0, 10), st.integers(0, 64)),
    st.tuples(st.just("version"), st.integers(0, 255), st.just(0)),
    st.tuples(st.just("dtype"), st.sampled_from(["float64", "f4", "<f4", "bool", "", "O", "float"]),
              st.just(0)),
    st.tuples(st.just("shape"), st.sampled_from(_SHAPES), st.just(0)),
)


def _mutate(frames: list[bytes], op: tuple) -> tuple[list[bytes], str | None]:
    """Apply one mutation to any frames; return them and, for a pristine message,
    the reason decode must give (None: any ProtocolError or a valid Message)."""
    kind, a, b = op
    frames = list(frames)
    if not frames:
        return frames, None
    if kind == "flip":
        i = a % len(frames)
        if frames[i]:
            f = bytearray(frames[i])
            f[(a // 7) % len(f)] ^= b
            frames[i] = bytes(f)
        return frames, None
    if kind == "truncate":
        i = a % len(frames)
        frames[i] = frames[i][: (a // 7) % (len(frames[i]) + 1)]
        return frames, None
    if kind == "drop":
        i = a % len(frames)
        del frames[i]
        return frames, "frame-count" if i > 0 else None
    if kind == "add":
        frames.insert(1 + a % len(frames), bytes(b))
        return frames, "frame-count"
    if kind == "version":
        frames[0] = frames[0][:2] + bytes([a]) + frames[0][3:]
        return frames, None if a == P.PROTOCOL_VERSION else "bad-version"
    try:  # dtype / shape: edit the first descriptor, if the header still has one
        body = json.loads(frames[0][4:])
        desc = body["a"][0]
        desc[1 if kind == "dtype" else 2] = a if kind == "dtype" else a[0]
    except (ValueError, TypeError, KeyError, IndexError, AttributeError):
        return frames, None
    frames[0] = frames[0][:4] + json.dumps(body).encode()
    return frames, "bad-dtype" if kind == "dtype" else a[1]


_VALID = [[bytes(f) for f in P.encode(m)] for m in (
    P.update_message(RUN, 2, 5, np.arange(64, dtype=np.float32), 32, 1.0,
                     extra_arrays={"i": np.arange(6, dtype=np.int64).reshape(2, 3)}),
    P.shard_message(RUN, 1, np.ones((3, 4, 4), np.uint8), np.arange(3, dtype=np.int64)),
)]


@FUZZ
@given(st.sampled_from(_VALID), st.lists(_MUTATIONS, min_size=1, max_size=3))
def test_fuzz_mutated_valid_messages(frames, ops):
    for i, op in enumerate(ops):
        frames, expect = _mutate(frames, op)
        if i == 0 and expect is not None:
            with pytest.raises(ProtocolError) as e:
                P.decode(frames)
            assert e.value.reason == expect, e.value
            return
    _decode_or_reject(frames)


@settings(max_examples=60, deadline=2000)
@given(st.lists(_MUTATIONS, min_size=1, max_size=3), st.booleans())
def test_fuzz_mutated_messages_through_a_socket(ops, router_side):
    """Mutated frames through real sockets: only ProtocolError, and the socket survives."""
    frames = _VALID[0]
    for op in ops:
        frames, _ = _mutate(frames, op)
    ctx = zmq.Context()
    try:
        a, b = _sock(ctx, zmq.DEALER), _sock(ctx, zmq.ROUTER if router_side else zmq.DEALER)
        b.bind("inproc://fuzz")
        a.connect("inproc://fuzz")
        a.send_multipart(frames or [b""])
        try:
            P.recv(b, router=router_side)
        except ProtocolError as e:
            assert e.reason in P.REASONS
        P.send(a, P.heartbeat(RUN, 1))
        assert P.recv(b, router=router_side)[1].type == MsgType.HEARTBEAT
    finally:
        ctx.destroy(linger=0)


def test_encode_without_the_check_makes_the_same_frames_and_the_receiver_still_checks():
    """The server's reply skips the sender's re-parse of its header (``check=False``): same bytes; a bad
    header then goes out, and ``decode`` refuses it as it would have."""
    w = np.arange(1000, dtype=np.float32)
    msg = P.weights_message("run1", 7, w)
    checked, fast = P.encode(msg), P.encode(msg, check=False)
    assert bytes(checked[0]) == bytes(fast[0]) and bytes(checked[1]) == bytes(fast[1])
    bad = P.weights_message("bad run id!", 7, w)
    with pytest.raises(P.ProtocolError):
        P.encode(bad)
    with pytest.raises(P.ProtocolError) as exc:
        P.decode(P.encode(bad, check=False))
    assert exc.value.reason == "bad-schema"
    with pytest.raises(P.ProtocolError):  # sizes are checked either way
        P.encode(msg, P.Limits(max_array_bytes=100), check=False)


@pytest.mark.parametrize("run, version", [("run1", 0), ("a.b:c@d+e-f_9", -1), ("x" * 128, 2**63 - 1), ("0123456789ab", 1201)])
def test_the_plain_weights_header_is_the_json_encoders_bytes(run, version):
    """The server's reply header is formatted directly (no JSON encoder): byte for byte what the checked path makes,
    and it decodes; anything but a plain WEIGHTS takes the general path."""
    w = np.linspace(-1, 1, 1001, dtype=np.float32)
    msg = P.weights_message(run, version, w)
    fast, checked = P.encode(msg, check=False), P.encode(msg)
    assert [bytes(f) for f in fast] == [bytes(f) for f in checked]
    back = P.decode(fast)
    assert back.run == run and back.version == version and np.array_equal(back.arrays["w"], w)
    for other in (P.weights_message(run, version, w, updates=3), P.weights_message(run, version, w.astype(np.float16)),
                  P.weights_message(run, version, w[::2]), P.weights_message(run, version, w.reshape(7, 143))):
        assert [bytes(f) for f in P.encode(other, check=False)] == [bytes(f) for f in P.encode(other)]
    with pytest.raises(P.ProtocolError) as exc:
        P.encode(msg, P.Limits(max_array_bytes=1000), check=False)
    assert exc.value.reason == "too-large"


def test_a_decoded_message_counts_the_bytes_it_came_in_without_encoding_its_header_again(monkeypatch):
    import dataclasses

    from zsgd.wire import frames as wire_frames

    g = np.arange(10, dtype=np.float32)
    sent = P.encode(P.update_message("ab" * 6, 1, 3, g, 8, 0.5))
    msg = P.decode(sent)
    assert msg.wire_bytes == sum(len(bytes(f)) for f in sent)
    calls = []
    monkeypatch.setattr(wire_frames, "_header_bytes", lambda m: calls.append(m) or b"")
    assert P.message_nbytes(msg) == msg.wire_bytes and not calls  # counted from the frames, not re-encoded
    copy = dataclasses.replace(msg, arrays={})  # e.g. the gradient taken from shared memory: counted afresh
    assert copy.wire_bytes is None
    P.message_nbytes(copy)
    assert calls == [copy]
