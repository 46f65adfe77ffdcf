"""Downloads against real HTTP servers on 127.0.0.1 serving small fake IDX files.

Nothing here touches the internet: the checksum table is replaced by one for
the fake files, and every mirror is a local ``http.server`` in a thread.
"""

from __future__ import annotations

import hashlib
import socket
import struct
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

import zsgd.data.downloader as downloader
from zsgd.data import download, load_dataset
from zsgd.data.downloader import RemoteFile, resolve_mirrors
from zsgd.data.idx import write_idx
from zsgd.errors import ZsgdError

from helpers import cli

SYSTEM = Path("/usr/share/datasets/fashion-mnist")
NAMES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
         "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")


class FakeMirror:
    """A local HTTP mirror. ``ranges``: honour Range; ``missing``: 404 everything;
    ``cut_after``: send a full Content-Length but close after that many bytes."""

    def __init__(self, files: dict[str, bytes], ranges: bool = True, missing: bool = False,
                 cut_after: int | None = None) -> None:
        self.files, self.ranges, self.missing, self.cut_after = files, ranges, missing, cut_after
        self.requests: list[tuple[str, str | None]] = []
        self.bytes_sent = 0
        self.lock = threading.Lock()
        mirror = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                name = self.path.rsplit("/", 1)[-1]
                mirror.requests.append((name, self.headers.get("Range")))
                if mirror.missing or name not in mirror.files:
                    self.send_error(404)
                    return
                body = mirror.files[name]
                start, status = 0, 200
                rng = self.headers.get("Range")
                if rng and mirror.ranges:
                    start = int(rng.removeprefix("bytes=").split("-")[0])
                    if start >= len(body):
                        self.send_error(416)
                        return
                    status = 206
                self.send_response(status)
                if status == 206:
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                self.send_header("Content-Length", str(len(body) - start))
                self.end_headers()
                payload = body[start:]
                if mirror.cut_after is not None:
                    payload = payload[: mirror.cut_after]
                # Counted before the write: the client may finish reading and the test
                # may check the count before this handler thread runs again.
                with mirror.lock:
                    mirror.bytes_sent += len(payload)
                self.wfile.write(payload)

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/mnist/"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def fake_files(monkeypatch, tmp_path) -> dict[str, bytes]:
    """Four small gzipped IDX files, with the checksum table patched to match them."""
    monkeypatch.setenv("ZSGD_HOME", str(tmp_path / "zsgd-home"))
    monkeypatch.setattr(downloader, "TIMEOUT_S", 5.0)
    rng = np.random.default_rng(0)
    arrays = [rng.integers(0, 256, (40, 28, 28), dtype=np.uint8), (np.arange(40) % 10).astype(np.uint8),
              rng.integers(0, 256, (10, 28, 28), dtype=np.uint8), (np.arange(10) % 10).astype(np.uint8)]
    src = tmp_path / "src"
    src.mkdir()
    files = {name: write_idx(src / name, arr).read_bytes() for name, arr in zip(NAMES, arrays)}
    table = [RemoteFile(name, len(blob), hashlib.sha256(blob).hexdigest(), hashlib.md5(blob).hexdigest())
             for name, blob in files.items()]
    monkeypatch.setitem(downloader.CHECKSUMS, "mnist", table)
    monkeypatch.setitem(downloader.CHECKSUMS, "fashion-mnist", table)
    monkeypatch.delenv("ZSGD_MIRROR_MNIST", raising=False)
    monkeypatch.delenv("ZSGD_MIRROR_FASHION_MNIST", raising=False)
    return files


@pytest.fixture
def mirrors() -> Iterator[list[FakeMirror]]:
    started: list[FakeMirror] = []
    yield started
    for m in started:
        m.close()


def serve(mirrors: list[FakeMirror], files: dict[str, bytes], **options) -> FakeMirror:
    mirror = FakeMirror(files, **options)
    mirrors.append(mirror)
    return mirror


def assert_complete(dest: Path, files: dict[str, bytes]) -> None:
    for name, blob in files.items():
        assert (dest / name).read_bytes() == blob
    assert not list(dest.glob("*.part"))


def test_download_success_then_load(fake_files, mirrors):
    m = serve(mirrors, fake_files)
    dest = download("mnist", mirrors=[m.url], progress=False)
    assert dest == downloader.dataset_cache_dir("mnist")
    assert_complete(dest, fake_files)
    ds = load_dataset("mnist")  # found in the cache now
    assert ds.source == str(dest) and ds.x_train.shape == (40, 1, 28, 28)
    # Verified files are skipped: no new requests.
    count = len(m.requests)
    download("mnist", mirrors=[m.url], progress=False)
    assert len(m.requests) == count


def test_progress_bar_path(fake_files, mirrors, tmp_path):
    m = serve(mirrors, fake_files)
    assert_complete(download("fashion-mnist", dest=tmp_path / "d", mirrors=[m.url], progress=True), fake_files)


def test_resume_after_truncated_part(fake_files, mirrors, tmp_path):
    m = serve(mirrors, fake_files)
    dest = tmp_path / "d"
    dest.mkdir()
    name = NAMES[0]
    have = len(fake_files[name]) // 3
    (dest / (name + ".part")).write_bytes(fake_files[name][:have])
    download("mnist", dest=dest, mirrors=[m.url], progress=False)
    assert_complete(dest, fake_files)
    assert (name, f"bytes={have}-") in m.requests
    assert m.bytes_sent == sum(len(b) for b in fake_files.values()) - have


def test_server_without_range_restarts_cleanly(fake_files, mirrors, tmp_path):
    m = serve(mirrors, fake_files, ranges=False)
    dest = tmp_path / "d"
    dest.mkdir()
    name = NAMES[0]
    # A part file the server will not continue; its bytes are even wrong, and must not survive.
    (dest / (name + ".part")).write_bytes(b"\x00" * 100)
    download("mnist", dest=dest, mirrors=[m.url], progress=False)
    assert_complete(dest, fake_files)
    assert (name, "bytes=100-") in m.requests


def test_stale_part_with_wrong_bytes_is_retried_from_zero(fake_files, mirrors, tmp_path):
    m = serve(mirrors, fake_files)
    dest = tmp_path / "d"
    dest.mkdir()
    (dest / (NAMES[0] + ".part")).write_bytes(b"\xff" * 50)  # resumed, then fails the checksum
    download("mnist", dest=dest, mirrors=[m.url], progress=False)
    assert_complete(dest, fake_files)
    assert [r for r in m.requests if r[0] == NAMES[0]] == [(NAMES[0], "bytes=50-"), (NAMES[0], None)]


def test_mirror_fallthrough(fake_files, mirrors, tmp_path):
    dead = serve(mirrors, fake_files, missing=True)
    with socket.socket() as s:  # a port with nobody listening: connection refused
        s.bind(("127.0.0.1", 0))
        refused = f"http://127.0.0.1:{s.getsockname()[1]}/"
    good = serve(mirrors, fake_files)
    dest = download("mnist", dest=tmp_path / "d", mirrors=[dead.url, refused, good.url], progress=False)
    assert_complete(dest, fake_files)
    assert len(dead.requests) == 4 and len(good.requests) == 4


def test_interrupted_transfer_resumes_on_next_mirror(fake_files, mirrors, tmp_path):
    flaky = serve(mirrors, fake_files, cut_after=1000)
    good = serve(mirrors, fake_files)
    dest = download("mnist", dest=tmp_path / "d", mirrors=[flaky.url, good.url], progress=False)
    assert_complete(dest, fake_files)
    assert (NAMES[0], "bytes=1000-") in good.requests


def test_all_mirrors_fail(fake_files, mirrors, tmp_path):
    dead = serve(mirrors, fake_files, missing=True)
    with pytest.raises(ZsgdError, match=r"could not download train-images-idx3-ubyte.gz from any mirror.*HTTP 404"):
        download("mnist", dest=tmp_path / "d", mirrors=[dead.url], progress=False)


def test_checksum_mismatch_removes_part_and_names_file_and_mirror(fake_files, mirrors, tmp_path):
    tampered = dict(fake_files)
    blob = bytearray(fake_files[NAMES[1]])
    blob[12] ^= 0xFF
    tampered[NAMES[1]] = bytes(blob)
    m = serve(mirrors, tampered)
    dest = tmp_path / "d"
    with pytest.raises(ZsgdError, match=rf"checksum mismatch for {NAMES[1]} from mirror {m.url}"):
        download("mnist", dest=dest, mirrors=[m.url], progress=False)
    assert not (dest / (NAMES[1] + ".part")).exists() and not (dest / NAMES[1]).exists()
    assert (dest / NAMES[0]).exists()  # files verified before it stay


def test_bad_existing_file_is_replaced(fake_files, mirrors, tmp_path):
    m = serve(mirrors, fake_files)
    dest = tmp_path / "d"
    dest.mkdir()
    (dest / NAMES[2]).write_bytes(b"not the real thing")
    download("mnist", dest=dest, mirrors=[m.url], progress=False)
    assert_complete(dest, fake_files)


def test_mirrors_from_environment(fake_files, mirrors, tmp_path, monkeypatch):
    m = serve(mirrors, fake_files)
    monkeypatch.setenv("ZSGD_MIRROR_FASHION_MNIST", f" http://127.0.0.1:1/nothing , {m.url.rstrip('/')}")
    assert resolve_mirrors("fashion-mnist") == ["http://127.0.0.1:1/nothing/", m.url]
    assert resolve_mirrors("fashion-mnist", ["http://x/"]) == ["http://x/"]
    assert_complete(download("fashion-mnist", dest=tmp_path / "d", progress=False), fake_files)


def test_default_mirrors():
    assert resolve_mirrors("mnist") == ["https://ossci-datasets.s3.amazonaws.com/mnist/",
                                        "https://storage.googleapis.com/cvdf-datasets/mnist/"]
    assert resolve_mirrors("fashion-mnist") == ["http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"]


def test_bad_names_and_mirrors():
    with pytest.raises(ZsgdError, match="cannot download 'cifar10'"):
        download("cifar10", progress=False)
    with pytest.raises(ZsgdError, match="mirror 'ftp://x/' is not an http"):
        download("mnist", mirrors=["ftp://x/"], progress=False)


def test_real_checksum_table_is_well_formed():
    for name, files in downloader.CHECKSUMS.items():
        assert [f.name for f in files] == list(NAMES)
        for f in files:
            assert len(f.sha256) == 64 and len(f.md5) == 32 and f.size > 0


def test_cli_download(fake_files, mirrors, tmp_path):
    m = serve(mirrors, fake_files)
    result = cli("data", "download", "MNIST", "--dest", str(tmp_path / "c"), "--mirror", m.url, "--quiet")
    assert result.exit_code == 0, result.output
    assert "verified files in" in result.output
    assert_complete(tmp_path / "c", fake_files)


def test_cli_download_failure_is_one_line_exit_2(fake_files, mirrors, tmp_path):
    dead = serve(mirrors, fake_files, missing=True)
    result = cli("data", "download", "mnist", "--dest", str(tmp_path / "c"), "--mirror", dead.url, "-q")
    assert result.exit_code == 2
    assert result.output.startswith("zsgd: error: could not download") and "Traceback" not in result.output


def test_range_not_satisfiable_restarts(fake_files, mirrors, tmp_path, monkeypatch):
    # The table's size is only a hint: a part as long as the served file gets 416 and is refetched.
    name = NAMES[3]
    table = [RemoteFile(f.name, f.size + 10 if f.name == name else f.size, f.sha256, f.md5)
             for f in downloader.CHECKSUMS["mnist"]]
    monkeypatch.setitem(downloader.CHECKSUMS, "mnist", table)
    m = serve(mirrors, fake_files)
    dest = tmp_path / "d"
    dest.mkdir()
    (dest / (name + ".part")).write_bytes(b"\x01" * len(fake_files[name]))
    download("mnist", dest=dest, mirrors=[m.url], progress=False)
    assert_complete(dest, fake_files)
    assert [r for r in m.requests if r[0] == name] == [(name, f"bytes={len(fake_files[name])}-"), (name, None)]


# Upstream gzip time stamps, recovered by matching the well-known MD5s (see downloader.py).
UPSTREAM_MTIME = {"train": 1504176606, "t10k": 1504176627}


@pytest.mark.skipif(not SYSTEM.is_dir(), reason="Debian dataset-fashion-mnist not installed")
@pytest.mark.parametrize("name", NAMES)
def test_fashion_mnist_checksums_derive_from_debian_files(name):
    """Debian's files are upstream's minus the gzip name and time stamp: put them back, compare digests."""
    raw = (SYSTEM / name).read_bytes()
    assert raw[:4] == b"\x1f\x8b\x08\x00"  # deflate, no FNAME flag
    stored_name = name.removesuffix(".gz").encode() + b"\x00"
    mtime = struct.pack("<I", UPSTREAM_MTIME[name.split("-")[0]])
    upstream = b"\x1f\x8b\x08\x08" + mtime + raw[8:10] + stored_name + raw[10:]
    expected = {f.name: f for f in downloader.CHECKSUMS["fashion-mnist"]}[name]
    assert len(upstream) == expected.size
    assert hashlib.md5(upstream).hexdigest() == expected.md5
    assert hashlib.sha256(upstream).hexdigest() == expected.sha256
