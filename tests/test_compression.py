"""Gradient codecs (zsgd.compression) and the per-coordinate staleness rule.

Every codec is checked against a plain numpy reference of its definition,
round-trips through the real wire protocol, and rejects malformed payloads
with ProtocolError (never another exception).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers import PlainSGD
from zsgd.wire import protocol as P
from zsgd.algorithms.base import Applied, Update
from zsgd.algorithms.staleness import CoordinateStaleness, CoordinateStalenessAsyncSGD, CoordinateStalenessSSP
from zsgd.compression import decode, encoded_nbytes, make_codec, parse_codec, touched_indices
from zsgd.compression.delta import DeltaReplyDecoder, DeltaReplyEncoder
from zsgd.errors import ZsgdError
from zsgd.wire.protocol import ProtocolError

SPECS = ["none", "topk:0.01", "topk:0.3", "adacomp:50", "adacomp:7", "qsgd:8", "qsgd:4", "qsgd:4,bucket=33"]


def vec(n: int, seed: int = 0, heavy: bool = True) -> np.ndarray:
    rng = np.random.default_rng(seed)
    g = rng.standard_normal(n)
    if heavy:  # gradients are heavy-tailed: a few big coordinates, many tiny ones
        g *= rng.random(n) ** 4
    return g.astype(np.float32)


# ---------------------------------------------------------------- specs


@pytest.mark.parametrize("spec, name", [
    ("none", "none"), ("topk", "topk:0.01"), ("topk:0.05", "topk:0.05"), ("topk:1", "topk:1.0"),
    ("adacomp", "adacomp:500"), ("adacomp:50", "adacomp:50"), ("qsgd", "qsgd:8"), ("qsgd:4", "qsgd:4"),
    ("qsgd:8,bucket=512", "qsgd:8"), ("qsgd:4,bucket=128", "qsgd:4,bucket=128"),
])
def test_spec_names_are_canonical_and_wire_valid(spec, name):
    codec = make_codec(spec, 1000)
    assert codec.name == name
    assert P._CODEC_RE.fullmatch(codec.name)
    assert parse_codec(codec.name).name == name  # the broker parses what the worker sends


@pytest.mark.parametrize("spec", [
    "", "gzip", "topk:0", "topk:1.5", "topk:-0.1", "topk:nan", "topk:x", "topk:", "adacomp:0", "adacomp:-3",
    "adacomp:1.5", "qsgd:2", "qsgd:16", "qsgd:8,bucket=0", "qsgd:8,buckets=4", "none:1", "topk 0.1",
])
def test_bad_spec_is_a_one_line_user_error(spec):
    with pytest.raises(ZsgdError) as info:
        make_codec(spec, 100)
    assert "\n" not in str(info.value) and (repr(spec) in str(info.value) or spec == "")


def test_unknown_codec_on_the_wire_is_a_protocol_error():
    with pytest.raises(ProtocolError) as info:
        decode("gzip:9", {"g": np.zeros(4, np.float32)}, 4)
    assert info.value.reason == "bad-schema"


# ---------------------------------------------------------------- none


def test_none_is_a_passthrough():
    g = vec(100)
    codec = make_codec("none", 100)
    arrays = codec.encode(g)
    assert list(arrays) == ["g"] and arrays["g"] is g
    np.testing.assert_array_equal(decode("none", arrays, 100), g)


# ---------------------------------------------------------------- top-k


def topk_reference(acc: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest |acc|, ties to the lowest index (stable sort)."""
    order = np.argsort(-np.abs(acc), kind="stable")
    return np.sort(order[:k])


@pytest.mark.parametrize("n, frac", [(1000, 0.01), (1000, 0.5), (1, 0.01), (997, 1.0), (5000, 0.003)])
def test_topk_sends_the_k_largest_and_keeps_the_rest(n, frac):
    codec = make_codec(f"topk:{frac}", n)
    k = math.ceil(frac * n)
    residual = np.zeros(n, np.float32)
    for step in range(4):
        g = vec(n, step)
        acc = g + residual  # float32, exactly what the codec adds
        arrays = codec.encode(g)
        idx, val = arrays["i"], arrays["v"]
        assert idx.dtype == np.int32 and val.dtype == np.float32 and idx.size == k
        np.testing.assert_array_equal(idx, topk_reference(acc, k))
        np.testing.assert_array_equal(val, acc[idx])
        dec = decode(codec.name, arrays, n)
        np.testing.assert_array_equal(dec[idx], acc[idx])
        np.testing.assert_array_equal(codec.residual + dec, acc)  # exact error feedback
        assert not codec.residual[idx].any()
        residual = codec.residual.copy()


def test_topk_ties_go_to_lowest_indices_and_zeros_are_fine():
    codec = make_codec("topk:0.5", 8)
    g = np.array([1, -2, 2, 0, 2, -2, 1, 0], np.float32)
    np.testing.assert_array_equal(codec.encode(g)["i"], [1, 2, 4, 5])
    codec = make_codec("topk:0.5", 8)
    np.testing.assert_array_equal(codec.encode(np.zeros(8, np.float32))["i"], [0, 1, 2, 3])


def test_topk_without_error_feedback_forgets():
    codec = make_codec("topk:0.1", 100, error_feedback=False)
    g = vec(100)
    a1, a2 = codec.encode(g), codec.encode(g)
    np.testing.assert_array_equal(a1["i"], a2["i"])
    assert not codec.residual.any()


def test_topk_subnormal_and_huge_magnitudes_order_correctly():
    g = np.array([1e-40, -3e38, 5e-39, 0.0, 7.0, -1e-45], np.float32)
    codec = make_codec("topk:0.5", 6)
    np.testing.assert_array_equal(codec.encode(g)["i"], [1, 2, 4])


# ---------------------------------------------------------------- AdaComp


def adacomp_reference(res: np.ndarray, g: np.ndarray, bin_size: int) -> np.ndarray:
    """Boolean mask of the coordinates AdaComp sends (paper's Algorithm 1, no quantization)."""
    G = res + g
    H = G + g
    n = G.size
    pad = (-n) % bin_size
    gmax = np.abs(np.concatenate([G, np.zeros(pad, np.float32)])).reshape(-1, bin_size).max(axis=1)
    gmax = np.repeat(gmax, bin_size)[:n]
    return (np.abs(H) >= gmax) & (G != 0) & (gmax > 0)


@pytest.mark.parametrize("n, bin_size", [(1000, 50), (1003, 7), (10, 500), (64, 1)])
def test_adacomp_sends_exactly_the_criterion_and_accounts_residual(n, bin_size):
    codec = make_codec(f"adacomp:{bin_size}", n)
    residual = np.zeros(n, np.float32)
    for step in range(5):
        g = vec(n, 10 + step)
        acc = residual + g
        mask = adacomp_reference(residual, g, bin_size)
        arrays = codec.encode(g)
        np.testing.assert_array_equal(arrays["i"], np.flatnonzero(mask))
        np.testing.assert_array_equal(arrays["v"], acc[mask])
        dec = decode(codec.name, arrays, n)
        np.testing.assert_array_equal(codec.residual + dec, acc)
        np.testing.assert_array_equal(codec.residual[mask], 0)
        np.testing.assert_array_equal(codec.residual[~mask], acc[~mask])
        residual = codec.residual.copy()


def test_adacomp_self_adjusting_criterion_by_hand():
    # One bin of 4. residual R, gradient dW: G = R + dW = [3, -1, 2.5, 0.5], g_max = 3,
    # H = G + dW = [4, -3, 1.5, 2.5]: |H| >= 3 for coordinates 0 and 1 only. Coordinate 2
    # is large but its latest gradient pushed it back, so it waits; coordinate 1 is small
    # but the latest gradient agrees with it, so it goes.
    codec = make_codec("adacomp:4", 4)
    codec.residual[:] = [2, 1, 3.5, 0.5]
    arrays = codec.encode(np.array([1, -2, -1, 0], np.float32))
    np.testing.assert_array_equal(arrays["i"], [0, 1])
    np.testing.assert_array_equal(arrays["v"], [3, -1])
    np.testing.assert_array_equal(codec.residual, [0, 0, 2.5, 0.5])


def test_adacomp_sends_nothing_for_zeros():
    codec = make_codec("adacomp:10", 30)
    arrays = codec.encode(np.zeros(30, np.float32))
    assert arrays["i"].size == 0 and arrays["v"].size == 0
    assert not decode(codec.name, arrays, 30).any()


# ---------------------------------------------------------------- QSGD


@pytest.mark.parametrize("spec", ["qsgd:8", "qsgd:4", "qsgd:4,bucket=7"])
def test_qsgd_error_is_within_one_level(spec):
    n = 1001  # odd: exercises the 4-bit padding nibble
    codec = make_codec(spec, n, seed=3)
    g = vec(n, 1)
    arrays = codec.encode(g)
    bucket, s = codec.bucket, codec.levels
    dec = decode(codec.name, arrays, n)
    m = np.repeat(arrays["m"], bucket)[:n]
    np.testing.assert_array_equal(arrays["m"], [np.abs(g[i:i + bucket]).max() for i in range(0, n, bucket)])
    assert np.all(np.abs(dec - g) <= m / s * (1 + 1e-5))
    assert np.all((dec == 0) | (np.sign(dec) == np.sign(g)))
    assert codec.residual is None


@pytest.mark.parametrize("spec", ["qsgd:8", "qsgd:4"])
def test_qsgd_is_unbiased(spec):
    n, trials = 600, 3000
    g = vec(n, 5)
    total = np.zeros(n, np.float64)
    codec = make_codec(spec, n, seed=11)
    for _ in range(trials):
        total += decode(codec.name, codec.encode(g), n)
    mean = total / trials
    # Each decoded coordinate is g plus noise bounded by m/s; its std is at most m/(2s).
    m = np.repeat(codec.encode(g)["m"], codec.bucket)[:n]
    tol = 5 * (m / codec.levels / 2) / math.sqrt(trials) + 1e-7
    assert np.all(np.abs(mean - g) <= tol)


def test_qsgd_is_deterministic_per_seed():
    g = vec(2000)
    a = make_codec("qsgd:4", 2000, seed=1)
    b = make_codec("qsgd:4", 2000, seed=1)
    c = make_codec("qsgd:4", 2000, seed=2)
    first = a.encode(g)["q"]
    np.testing.assert_array_equal(first, b.encode(g)["q"])
    assert not np.array_equal(first, c.encode(g)["q"])
    assert not np.array_equal(first, a.encode(g)["q"])  # a fresh draw each call


def test_qsgd_levels_hit_the_extremes_exactly():
    g = np.array([-2, 2, 1, 0], np.float32)
    for spec, s in (("qsgd:8", 127), ("qsgd:4", 7)):
        codec = make_codec(spec, 4)
        dec = decode(codec.name, codec.encode(g), 4)
        assert dec[0] == -2 and dec[1] == 2 and dec[3] == 0
        level = float(dec[2]) * s / 2
        assert abs(level - round(level)) < 1e-5 and round(level) in (s // 2, s // 2 + 1)


# ---------------------------------------------------------------- wire


@pytest.mark.parametrize("spec", SPECS)
def test_wire_sizes_and_round_trip_through_the_protocol(spec):
    n = 5000
    codec = make_codec(spec, n, seed=7)
    g = vec(n)
    arrays = codec.encode(g)
    expected = decode(codec.name, arrays, n)
    msg = P.update_message("run-1", 3, 17, None, 32, 0.5, codec=codec.name, extra_arrays=arrays)
    frames = P.encode(msg, P.Limits.for_model(n))
    assert P.message_nbytes(msg) == len(frames[0]) + encoded_nbytes(arrays)
    got = P.decode([bytes(f) for f in frames], P.Limits.for_model(n))
    P.validate_update(got, run="run-1", known_workers={3}, n_params=n)
    assert got.codec == codec.name
    np.testing.assert_array_equal(decode(got.codec, got.arrays, n), expected)
    idx = touched_indices(got.codec, got.arrays)
    assert (idx is None) == (codec.spec.kind in ("none", "qsgd"))


def test_compression_ratios_on_a_gradient_sized_vector():
    n = 100_000
    g = vec(n)
    ratio = {s: 4 * n / encoded_nbytes(make_codec(s, n).encode(g)) for s in ("none", "topk:0.01", "qsgd:8", "qsgd:4")}
    assert ratio["none"] == 1.0
    assert 49 < ratio["topk:0.01"] <= 50
    assert 3.9 < ratio["qsgd:8"] < 4 and 7.8 < ratio["qsgd:4"] < 8


# ---------------------------------------------------------------- malformed payloads


def sparse(idx, val=None, idt=np.int32, vdt=np.float32):
    idx = np.asarray(idx, idt)
    return {"i": idx, "v": np.ones(idx.size, vdt) if val is None else np.asarray(val, vdt)}


@pytest.mark.parametrize("codec, arrays, reason", [
    ("adacomp:10", sparse([0, 10]), "bad-array"),  # out of range
    ("adacomp:10", sparse([-1, 3]), "bad-array"),  # negative
    ("adacomp:10", sparse([3, 2]), "bad-array"),  # unsorted
    ("adacomp:10", sparse([2, 2]), "bad-array"),  # duplicated
    ("adacomp:10", {"i": np.array([1, 2], np.int32), "v": np.ones(3, np.float32)}, "wrong-shape"),
    ("adacomp:10", sparse(np.arange(10)) | {"i": np.zeros(11, np.int32), "v": np.zeros(11, np.float32)}, "wrong-shape"),
    ("adacomp:10", sparse([1, 2], idt=np.int64), "wrong-dtype"),
    ("adacomp:10", sparse([1, 2], vdt=np.float16), "wrong-dtype"),
    ("adacomp:10", sparse([1, 2], [1.0, np.nan]), "non-finite"),
    ("adacomp:10", sparse([1, 2], [np.inf, 1.0]), "non-finite"),
    ("adacomp:10", {"i": np.array([1], np.int32)}, "missing-array"),
    ("adacomp:10", sparse([1]) | {"x": np.zeros(1, np.float32)}, "bad-schema"),
    ("adacomp:10", {"i": np.array([[1]], np.int32), "v": np.ones((1, 1), np.float32)}, "wrong-shape"),
    ("topk:0.2", sparse([1]), "wrong-shape"),  # k must be ceil(0.2 * 10) = 2
    ("topk:0.2", sparse([1, 10]), "bad-array"),
    ("none", {"g": np.zeros(9, np.float32)}, "wrong-shape"),
    ("none", {"g": np.zeros(10, np.float16)}, "wrong-dtype"),
    ("none", {"g": np.full(10, np.nan, np.float32)}, "non-finite"),
    ("qsgd:8", {"m": np.array([np.nan], np.float32), "q": np.zeros(10, np.int8)}, "non-finite"),
    ("qsgd:8", {"m": np.array([-1.0], np.float32), "q": np.zeros(10, np.int8)}, "bad-array"),
    ("qsgd:8", {"m": np.array([1.0], np.float32), "q": np.full(10, -128, np.int8)}, "bad-array"),
    ("qsgd:8", {"m": np.array([1.0, 1.0], np.float32), "q": np.zeros(10, np.int8)}, "wrong-shape"),
    ("qsgd:8", {"m": np.array([1.0], np.float32), "q": np.zeros(9, np.int8)}, "wrong-shape"),
    ("qsgd:8", {"m": np.array([1.0], np.float32), "q": np.zeros(10, np.uint8)}, "wrong-dtype"),
    ("qsgd:4", {"m": np.array([1.0], np.float32), "q": np.full(5, 0x08, np.uint8)}, "bad-array"),  # level -8
    ("qsgd:4", {"m": np.array([0.0], np.float32), "q": np.full(5, 0x80, np.uint8)}, "bad-array"),  # even at scale 0
    ("qsgd:8", {"m": np.array([0.0], np.float32), "q": np.full(10, -128, np.int8)}, "bad-array"),
    ("qsgd:4", {"m": np.array([1.0], np.float32), "q": np.zeros(10, np.uint8)}, "wrong-shape"),
])
def test_malformed_payloads_are_protocol_errors(codec, arrays, reason):
    with pytest.raises(ProtocolError) as info:
        decode(codec, arrays, 10)
    assert info.value.reason == reason


def test_qsgd4_padding_nibble_must_be_zero():
    ok = {"m": np.array([1.0], np.float32), "q": np.zeros(3, np.uint8)}
    decode("qsgd:4", ok, 5)
    with pytest.raises(ProtocolError):
        decode("qsgd:4", ok | {"q": np.array([0, 0, 0x10], np.uint8)}, 5)


def test_read_only_unaligned_wire_views_decode():
    n = 64
    codec = make_codec("topk:0.25", n)
    arrays = codec.encode(vec(n))
    buf = bytearray(1) + arrays["i"].tobytes()
    idx = np.frombuffer(memoryview(buf)[1:], dtype=np.int32)  # unaligned, read-only
    out = decode(codec.name, {"i": idx, "v": arrays["v"]}, n)
    np.testing.assert_array_equal(out[arrays["i"]], arrays["v"])


payload_arrays = st.dictionaries(
    st.sampled_from(["i", "v", "g", "m", "q", "x"]),
    st.tuples(st.sampled_from(["int32", "float32", "int8", "uint8", "int64", "float16"]),
              st.integers(0, 40), st.integers(0, 2**32 - 1)),
    max_size=3,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(codec=st.sampled_from(SPECS + ["topk:1", "qsgd:4,bucket=3", "adacomp:1"]), spec=payload_arrays,
       n=st.integers(1, 30))
def test_decode_never_raises_anything_but_protocol_error(codec, spec, n):
    arrays = {}
    for name, (dt, size, seed) in spec.items():
        raw = np.random.default_rng(seed).integers(0, 256, size * np.dtype(dt).itemsize, dtype=np.uint8)
        arrays[name] = raw.view(dt)
    try:
        out = decode(codec, arrays, n)
    except ProtocolError:
        return
    assert out.shape == (n,) and out.dtype == np.float32 and np.isfinite(out).all()


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 300), frac=st.floats(0.001, 1.0), bin_size=st.integers(1, 64), seed=st.integers(0, 10**6))
def test_property_sparse_codecs_conserve_the_gradient(n, frac, bin_size, seed):
    for spec in (f"topk:{frac}", f"adacomp:{bin_size}"):
        codec = make_codec(spec, n)
        total_in = np.zeros(n, np.float64)
        total_out = np.zeros(n, np.float64)
        for step in range(3):
            g = vec(n, seed + step)
            before = codec.residual.copy()
            dec = decode(codec.name, codec.encode(g), n)
            np.testing.assert_array_equal(codec.residual + dec, before + g)
            total_in += g
            total_out += dec
        np.testing.assert_allclose(total_out + codec.residual, total_in, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- reply deltas


@pytest.mark.parametrize("spec", ["none", "topk:0.1", "qsgd:4", "adacomp:20"])
def test_delta_replies_keep_worker_and_broker_in_sync(spec):
    n = 500
    enc = DeltaReplyEncoder(spec, n, seed=1)
    w = vec(n, 0, heavy=False)
    assert enc.encode(0, w) is None  # no mirror yet: send full weights
    enc.full(0, w)
    dec = DeltaReplyDecoder(enc.name, n)
    dec.full(w)
    errors = []
    for step in range(30):
        w = w - 0.01 * vec(n, step + 1, heavy=False)
        arrays = enc.encode(0, w)
        got = dec.apply(arrays)
        np.testing.assert_array_equal(got, enc.mirrors[0])  # bit-identical on both sides
        errors.append(float(np.abs(got - w).max()))
    if spec == "none":
        assert max(errors) < 1e-6
    assert errors[-1] < 0.1  # lossy codecs trail the model by a bounded error
    enc.forget(0)
    assert enc.encode(0, w) is None


def test_delta_decoder_rejects_unknown_names_and_early_deltas():
    with pytest.raises(ProtocolError):
        DeltaReplyDecoder("topk:0.1", 10)
    with pytest.raises(ProtocolError):
        DeltaReplyDecoder("delta+zip", 10)
    with pytest.raises(ProtocolError):
        DeltaReplyDecoder("delta+none", 10).apply({"g": np.zeros(10, np.float32)})


# ---------------------------------------------------------------- per-coordinate staleness


def test_staleness_counts_touches_since_the_base_version():
    t = CoordinateStaleness(10)
    np.testing.assert_array_equal(t.scale(np.array([0, 5]), 0, 0), [1, 1])  # nothing intervened
    t.record(np.array([1, 2]), 1)
    t.record(np.array([2, 3]), 2)
    t.record(None, 3)  # dense: touches all
    t.record(np.array([2]), 4)
    # Worker fetched at version 0, now at 4: coordinate 0 saw only the dense update,
    # 1 saw v1 and v3, 2 saw v1 v2 v3 v4, 3 saw v2 v3.
    np.testing.assert_array_equal(t.scale(np.array([0, 1, 2, 3]), 0, 4), [1, 2, 4, 2])
    # Fetched at version 2: only v3 (dense) and v4 count.
    np.testing.assert_array_equal(t.scale(np.array([0, 1, 2, 3]), 2, 4), [1, 1, 2, 1])
    np.testing.assert_array_equal(t.scale(None, 1, 4), [1, 1, 3, 2, 1, 1, 1, 1, 1, 1])
    np.testing.assert_array_equal(t.scale(np.array([2]), 4, 4), [1])


def test_staleness_beyond_depth_extrapolates_and_is_exact_for_hot_coordinates():
    t = CoordinateStaleness(4, depth=2)
    for v in range(1, 21):
        t.record(np.array([0]) if v % 2 else np.array([0, 1]), v)  # 0 every update, 1 every other
    out = t.scale(np.array([0, 1, 2]), 0, 20)
    assert out[0] == 20 and out[2] == 1
    assert abs(out[1] - 10) <= 1  # estimated: stored touches 20, 18 say "every other update"
    assert t.scale(np.array([1]), 17, 20)[0] == 2  # within depth: exact
    with pytest.raises(ValueError):
        t.record(None, 20)  # versions must increase
    with pytest.raises(ValueError):
        t.scale(None, 3, 2)
    with pytest.raises(ValueError):
        t.scale(np.array([4]), 0, 20)  # out of range: refused before any kernel indexes with it


@settings(max_examples=80, deadline=None)
@given(n=st.integers(1, 12), depth=st.integers(1, 5), seed=st.integers(0, 10**6), n_updates=st.integers(0, 25))
def test_property_staleness_matches_brute_force(n, depth, seed, n_updates):
    rng = np.random.default_rng(seed)
    t = CoordinateStaleness(n, depth=depth)
    touched, is_dense = [], []  # touched[v-1] = boolean mask of update v
    for v in range(1, n_updates + 1):
        is_dense.append(rng.random() < 0.2)
        if is_dense[-1]:
            t.record(None, v)
            touched.append(np.ones(n, bool))
        else:
            idx = np.flatnonzero(rng.random(n) < 0.4).astype(np.int32)
            t.record(idx, v)
            touched.append(np.isin(np.arange(n), idx))
    base = int(rng.integers(0, n_updates + 1))
    true = np.sum(touched[base:], axis=0) if n_updates > base else np.zeros(n)
    dense = sum(is_dense[base:])
    got = t.scale(None, base, n_updates)
    np.testing.assert_array_equal(t.scale(np.arange(n), base, n_updates), got)
    assert np.all(got >= 1) and np.all(got <= max(1, n_updates - base))
    exact = (true - dense) < depth  # fewer sparse touches than remembered: must be exact
    np.testing.assert_array_equal(got[exact], np.maximum(1, true[exact]))


def test_async_server_divides_each_coordinate_by_its_own_staleness():
    algo = CoordinateStalenessAsyncSGD(np.zeros(4, np.float32), PlainSGD(1.0))
    for w in range(3):
        algo.add_worker(w, 0.0)
    one = np.ones(4, np.float32)
    # Worker 0: sparse on {0, 1}; worker 1: sparse on {1}; both fetched version 0.
    algo.on_update(Update(0, 0, one * [1, 1, 0, 0], 1, meta={"indices": np.array([0, 1], np.int32)}), 1.0)
    out = algo.on_update(Update(1, 0, one * [0, 1, 0, 0], 1, meta={"indices": np.array([1], np.int32)}), 2.0)
    assert [o.staleness for o in out if isinstance(o, Applied)] == [1]
    np.testing.assert_array_equal(algo.w, [-1, -2, 0, 0])  # coordinate 1: one touch in between, divisor 1
    # Worker 2 sends a dense update from version 0: coordinate 0 was touched once, 1 twice, 2 and 3 never.
    algo.on_update(Update(2, 0, one * 6, 1), 3.0)
    np.testing.assert_array_equal(algo.w, [-1 - 6, -2 - 3, -6, -6])


def test_ssp_server_with_per_coordinate_rule_keeps_its_bound():
    algo = CoordinateStalenessSSP(np.zeros(3, np.float32), PlainSGD(1.0), bound=0)
    algo.add_worker(0, 0.0)
    algo.add_worker(1, 0.0)
    idx = np.array([0], np.int32)
    algo.on_update(Update(0, 0, np.array([2, 0, 0], np.float32), 1, meta={"indices": idx}), 1.0)
    assert algo.held == {0}  # SSP's own rule still runs
    algo.on_update(Update(1, 0, np.array([4, 4, 4], np.float32), 1), 2.0)
    np.testing.assert_array_equal(algo.w, [-2 - 4, -4, -4])  # coordinate 0: one touch in between
    algo.on_update(Update(1, 1, np.array([4, 4, 4], np.float32), 1, meta={"indices": None}), 3.0)
    np.testing.assert_array_equal(algo.w, [-6 - 4, -4 - 4, -4 - 4])  # one update (v2) in between: divisor 1
