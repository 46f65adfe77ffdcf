"""IDX reader: round trips, compression detected by bytes, and every corruption a ZsgdError naming the file."""

from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from zsgd.data.idx import is_gzip, read_idx, write_idx
from zsgd.errors import ZsgdError


@pytest.fixture
def images() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, size=(7, 28, 28), dtype=np.uint8)


@pytest.fixture
def labels() -> np.ndarray:
    return np.random.default_rng(1).integers(0, 10, size=7, dtype=np.uint8)


@pytest.mark.parametrize("compress", [True, False])
def test_round_trip_images_and_labels(tmp_path, images, labels, compress):
    pi = write_idx(tmp_path / "img", images, compress=compress)
    pl = write_idx(tmp_path / "lab", labels, compress=compress)
    assert is_gzip(pi) is compress
    out_i, out_l = read_idx(pi, expect="images"), read_idx(pl, expect="labels")
    np.testing.assert_array_equal(out_i, images)
    np.testing.assert_array_equal(out_l, labels)
    assert out_i.dtype == np.uint8 and out_i.flags.writeable


def test_compression_detected_by_magic_not_name(tmp_path, images):
    gz_named_raw = write_idx(tmp_path / "raw-but-named.gz", images, compress=False)
    raw_named_gz = write_idx(tmp_path / "gz-but-named-raw", images, compress=True)
    np.testing.assert_array_equal(read_idx(gz_named_raw), images)
    np.testing.assert_array_equal(read_idx(raw_named_gz), images)


def test_gzip_output_is_deterministic(tmp_path, images):
    a = write_idx(tmp_path / "a.gz", images).read_bytes()
    b = write_idx(tmp_path / "b.gz", images).read_bytes()
    assert a == b


def test_bad_magic_names_file(tmp_path):
    path = tmp_path / "weird-idx"
    path.write_bytes(struct.pack(">II", 0x00000802, 3) + b"\x00\x01\x02")
    with pytest.raises(ZsgdError, match="weird-idx.*magic 0x00000802"):
        read_idx(path)


def test_expect_mismatch(tmp_path, labels):
    path = write_idx(tmp_path / "labels.gz", labels)
    with pytest.raises(ZsgdError, match="labels.gz holds IDX labels, but images were expected"):
        read_idx(path, expect="images")


@pytest.mark.parametrize("compress", [True, False])
def test_truncated_data_names_file(tmp_path, images, compress):
    payload = struct.pack(">IIII", 0x803, 7, 28, 28) + images.tobytes()[:-100]
    if compress:
        payload = gzip.compress(payload)
    path = tmp_path / "short-images"
    path.write_bytes(payload)
    with pytest.raises(ZsgdError, match=r"short-images is truncated: header promises 5488 data bytes, found 5388"):
        read_idx(path)


def test_truncated_header(tmp_path):
    path = tmp_path / "tiny"
    path.write_bytes(struct.pack(">I", 0x803) + b"\x00\x00")
    with pytest.raises(ZsgdError, match="tiny is truncated inside its IDX header"):
        read_idx(path)
    path.write_bytes(b"\x00")
    with pytest.raises(ZsgdError, match="tiny is too short"):
        read_idx(path)


def test_trailing_bytes_rejected(tmp_path, labels):
    path = tmp_path / "long-labels"
    path.write_bytes(struct.pack(">II", 0x801, 7) + labels.tobytes() + b"junk")
    with pytest.raises(ZsgdError, match="long-labels has 4 bytes after the data"):
        read_idx(path)


def test_zero_dimension_rejected(tmp_path):
    path = tmp_path / "empty-dims"
    path.write_bytes(struct.pack(">IIII", 0x803, 0, 28, 28))
    with pytest.raises(ZsgdError, match="empty-dims has implausible IDX dimensions"):
        read_idx(path)


def test_cut_gzip_stream_names_file(tmp_path, images):
    blob = write_idx(tmp_path / "x.gz", images).read_bytes()
    path = tmp_path / "cut.gz"
    path.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(ZsgdError, match="cut.gz is a corrupt or truncated gzip file"):
        read_idx(path)


def test_corrupt_gzip_names_file(tmp_path, images):
    blob = bytearray(write_idx(tmp_path / "x.gz", images).read_bytes())
    for i in range(20, len(blob) - 20, 7):
        blob[i] ^= 0xFF
    path = tmp_path / "garbled.gz"
    path.write_bytes(bytes(blob))
    with pytest.raises(ZsgdError, match="garbled.gz"):
        read_idx(path)


def test_bad_crc_names_file(tmp_path, labels):
    blob = bytearray(write_idx(tmp_path / "x.gz", labels).read_bytes())
    blob[-8] ^= 0xFF  # CRC32 trailer
    path = tmp_path / "badcrc.gz"
    path.write_bytes(bytes(blob))
    with pytest.raises(ZsgdError, match="badcrc.gz is a corrupt or truncated gzip file"):
        read_idx(path)


def test_missing_file(tmp_path):
    with pytest.raises(ZsgdError, match="nope.gz does not exist"):
        read_idx(tmp_path / "nope.gz")


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(1, 5), h=st.integers(1, 9), w=st.integers(1, 9),
    compress=st.booleans(), seed=st.integers(0, 2**32 - 1),
)
def test_round_trip_property(tmp_path_factory, n, h, w, compress, seed):
    arr = np.random.default_rng(seed).integers(0, 256, size=(n, h, w), dtype=np.uint8)
    path = write_idx(tmp_path_factory.mktemp("idx") / "a", arr, compress=compress)
    np.testing.assert_array_equal(read_idx(path), arr)


def test_writer_rejects_unsupported(tmp_path):
    with pytest.raises(ValueError):
        write_idx(tmp_path / "a", np.zeros((2, 2), dtype=np.uint8))
    with pytest.raises(ValueError):
        write_idx(tmp_path / "a", np.zeros(3, dtype=np.int32))
