"""Shards: deterministic partitions with the promised label properties; BatchStream epochs."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from zsgd.data import BatchStream, Split, make_shard, make_shards, parse_split
from zsgd.data.shards import worker_classes
from zsgd.errors import ZsgdError

LABELS = np.repeat(np.arange(10), 100)[np.random.default_rng(3).permutation(1000)]


def assert_partition(shards: list[np.ndarray], n: int, complete: bool = True) -> None:
    joined = np.concatenate(shards)
    assert len(np.unique(joined)) == len(joined), "shards overlap"
    if complete:
        assert np.array_equal(np.sort(joined), np.arange(n)), "shards do not cover the data"
    for s in shards:
        assert s.dtype == np.int64 and np.all(np.diff(s) > 0)


@pytest.mark.parametrize("spec", ["iid", "shards", "dirichlet:0.3", "classes:2"])
def test_deterministic_and_matches_make_shards(spec):
    all_shards = make_shards(LABELS, spec, seed=7, n_workers=6)
    for w in range(6):
        again = make_shard(LABELS, spec, seed=7, worker=w, n_workers=6)
        np.testing.assert_array_equal(again, all_shards[w])
    assert_partition(all_shards, len(LABELS), complete=spec != "classes:2")


def test_iid_equal_slices_and_seed_matters():
    shards = make_shards(LABELS, "iid", seed=1, n_workers=7)
    assert {len(s) for s in shards} <= {142, 143}
    other = make_shards(LABELS, "iid", seed=2, n_workers=7)
    assert not np.array_equal(shards[0], other[0])
    # Every worker sees roughly every class.
    assert all(len(np.unique(LABELS[s])) == 10 for s in shards)


def test_shards_are_contiguous_blocks_of_the_original_order():
    shards = make_shards(LABELS, "shards", seed=99, n_workers=4)
    assert [s[0] for s in shards] == [0, 250, 500, 750]
    for s in shards:
        np.testing.assert_array_equal(s, np.arange(s[0], s[0] + 250))
    np.testing.assert_array_equal(make_shard(LABELS, "shards", 0, 1, 4), shards[1])


def test_dirichlet_skew_follows_alpha():
    def mean_classes(alpha: float) -> float:
        shards = make_shards(LABELS, f"dirichlet:{alpha}", seed=0, n_workers=10)
        assert_partition(shards, len(LABELS))
        return float(np.mean([len(np.unique(LABELS[s])) for s in shards]))

    assert mean_classes(0.05) < 4.0
    assert mean_classes(1000.0) == 10.0


def test_dirichlet_gives_every_worker_a_sample():
    labels = np.repeat(np.arange(3), 20)
    shards = make_shards(labels, "dirichlet:0.001", seed=5, n_workers=40)
    assert all(len(s) >= 1 for s in shards)
    assert_partition(shards, len(labels))


def test_classes_k_each_worker_sees_k_classes_and_all_covered():
    shards = make_shards(LABELS, "classes:2", seed=0, n_workers=5)
    seen = [set(np.unique(LABELS[s]).tolist()) for s in shards]
    assert all(len(s) == 2 for s in seen)
    assert set().union(*seen) == set(range(10))
    assert_partition(shards, len(LABELS))  # 2 * 5 == 10: exactly covers
    # More workers than needed: classes are shared, still disjoint.
    shards = make_shards(LABELS, "classes:3", seed=0, n_workers=8)
    assert all(len(np.unique(LABELS[s])) == 3 for s in shards)
    assert_partition(shards, len(LABELS))


def test_classes_round_robin_assignment():
    assert worker_classes(0, 2, 10) == [0, 1]
    assert worker_classes(4, 2, 10) == [8, 9]
    assert worker_classes(5, 2, 10) == [0, 1]
    assert worker_classes(3, 3, 10) == [0, 1, 9]  # classes 9, 10 and 11 wrap to 9, 0, 1


def test_classes_uncovered_when_too_few_workers():
    shards = make_shards(LABELS, "classes:1", seed=0, n_workers=3)
    assert [set(np.unique(LABELS[s]).tolist()) for s in shards] == [{0}, {1}, {2}]
    assert_partition(shards, len(LABELS), complete=False)


@pytest.mark.parametrize(
    "spec", ["", "random", "iid:2", "dirichlet", "dirichlet:", "dirichlet:-1", "dirichlet:abc",
             "dirichlet:inf", "classes:0", "classes:x", "classes:1.5"],
)
def test_parse_split_rejects_bad_specs(spec):
    with pytest.raises(ZsgdError, match=f"invalid split '{spec}'"):
        parse_split(spec)


def test_parse_split_accepts_and_round_trips():
    for spec in ("iid", "shards", "dirichlet:0.5", "classes:3", " IID "):
        parsed = parse_split(spec)
        assert parse_split(str(parsed)) == parsed
    assert parse_split("dirichlet:0.5") == Split("dirichlet", alpha=0.5)


def test_bad_worker_arguments():
    with pytest.raises(ZsgdError, match="worker index 4 is out of range for 4 workers"):
        make_shard(LABELS, "iid", 0, 4, 4)
    with pytest.raises(ZsgdError, match="cannot split 1000 training samples across 1001 workers"):
        make_shard(LABELS, "iid", 0, 0, 1001)
    with pytest.raises(ZsgdError, match="more classes than the data set has"):
        make_shards(LABELS, "classes:11", 0, 2)
    with pytest.raises(ZsgdError, match="leaves worker"):
        make_shards(np.array([0, 1, 1]), "classes:1", 0, 3)


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 300), n_workers=st.integers(1, 12), n_classes=st.integers(1, 6),
    seed=st.integers(0, 2**40), kind=st.sampled_from(["iid", "shards", "dirichlet:0.1", "dirichlet:5"]),
)
def test_partition_property(n, n_workers, n_classes, seed, kind):
    if n_workers > n:
        return
    labels = np.random.default_rng(seed).integers(0, n_classes, n)
    shards = make_shards(labels, kind, seed, n_workers)
    assert len(shards) == n_workers and all(len(s) >= 1 for s in shards)
    assert_partition(shards, n)
    w = seed % n_workers
    np.testing.assert_array_equal(make_shard(labels, kind, seed, w, n_workers), shards[w])


def test_batch_stream_epochs():
    indices = np.arange(100, 120)
    stream = BatchStream(indices, batch_size=5, seed=1)
    first_epoch = np.concatenate([next(stream) for _ in range(4)])
    assert sorted(first_epoch.tolist()) == list(range(100, 120))
    assert stream.epoch == 1 and stream.samples_seen == 20 and stream.epoch_fraction == 1.0
    second_epoch = np.concatenate([stream.next_batch() for _ in range(4)])
    assert sorted(second_epoch.tolist()) == list(range(100, 120))
    assert not np.array_equal(first_epoch, second_epoch), "each epoch is reshuffled"
    assert stream.epoch == 2 and stream.samples_seen == 40


def test_batch_stream_deterministic_and_spans_epochs():
    a = BatchStream(np.arange(7), batch_size=3, seed=42)
    b = BatchStream(np.arange(7), batch_size=3, seed=42)
    batches = [next(a) for _ in range(5)]
    for batch in batches:
        np.testing.assert_array_equal(batch, next(b))
        assert batch.dtype == np.int64 and len(batch) == 3
    assert a.epoch == 2 and a.samples_seen == 15  # 15 = 2 full passes of 7 + 1
    c = BatchStream(np.arange(7), batch_size=3, seed=43)
    assert not all(np.array_equal(x, next(c)) for x in batches)


def test_batch_stream_batch_bigger_than_shard():
    stream = BatchStream(np.array([5, 6]), batch_size=5, seed=0)
    batch = next(stream)
    assert len(batch) == 5 and set(batch.tolist()) == {5, 6} and stream.epoch == 2


def test_batch_stream_bad_arguments():
    with pytest.raises(ZsgdError, match="empty shard"):
        BatchStream(np.array([], dtype=np.int64), 4)
    with pytest.raises(ZsgdError, match="batch size must be at least 1"):
        BatchStream(np.arange(3), 0)
    assert iter(BatchStream(np.arange(3), 1)) is not None


def _reference_batches(indices: np.ndarray, batch_size: int, seed: int, n: int) -> tuple[list[list[int]], int]:
    """The stream as first written: epoch e ordered by SeedSequence([seed mod 2**64, e]), one index at a time."""
    def order(e: int) -> np.ndarray:
        return indices[np.random.default_rng(np.random.SeedSequence([seed & 0xFFFFFFFFFFFFFFFF, e])).permutation(len(indices))]

    out, cur, pos, epoch = [], order(0), 0, 0
    for _ in range(n):
        batch = []
        while len(batch) < batch_size:
            batch.append(int(cur[pos]))
            pos += 1
            if pos == len(cur):
                epoch, cur, pos = epoch + 1, order(epoch + 1), 0
        out.append(batch)
    return out, epoch


@pytest.mark.parametrize("seed", [0, 1, 2**32 - 1, 2**32, 2**40 + 7, 2**64 - 1, 2**64 + 3, -1])
@pytest.mark.parametrize("n", [1, 2, 10, 100])
def test_batch_stream_is_the_reference_stream(seed, n):
    """The seed given as SeedSequence's 32-bit words and the one-sample shortcut change no batch (the simulator's
    metrics are bit-identical to what they were), for seeds of one and two words and shards smaller than a batch."""
    indices = np.arange(1000, 1000 + n)
    stream = BatchStream(indices, batch_size=7, seed=seed)
    expected, epoch = _reference_batches(indices, 7, seed, 25)
    assert [next(stream).tolist() for _ in range(25)] == expected
    assert stream.epoch == epoch and stream.samples_seen == 25 * 7


def test_one_sample_shard_is_that_sample_every_pass():
    stream = BatchStream(np.array([42]), batch_size=64, seed=3)
    batch = next(stream)
    assert batch.dtype == np.int64 and batch.tolist() == [42] * 64 and stream.epoch == 64 and stream.epoch_fraction == 64.0
