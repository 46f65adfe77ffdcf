"""Compression and local SGD in real runs: encoded on the worker, decoded and accounted at the broker."""

from __future__ import annotations

import json

import pytest

from helpers import cli, lines_of, run_zsgd

FAST = ["--model", "logreg", "--data", "embedded", "--batch-size", "32", "--lr", "0.05", "--heartbeat", "0.5", "--timeout", "3", "--quiet", "--no-plots"]  # the PNGs are tested where a test looks at them


@pytest.mark.slow
@pytest.mark.parametrize("args,min_ratio", [
    (["--algo", "async", "--compress", "topk:0.01"], 30.0),
    (["--algo", "async", "--compress", "adacomp:500", "--staleness-lr", "per-coordinate"], 2.0),
    (["--algo", "localsgd:4", "--compress", "qsgd:8"], 3.0),
    (["--algo", "sync", "--compress", "qsgd:4"], 6.0),
])
def test_compressed_runs_train_and_account_bytes(tmp_path, args, min_ratio, no_orphans):
    out = tmp_path / "run"
    proc = run_zsgd("run", "--n-proc", "2", "--steps", "300", *args, *FAST, "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    s = json.loads((out / "summary.json").read_text())
    assert s["rejected_messages"] == 0
    assert s["compression_ratio"] >= min_ratio
    assert s["test_accuracy"] > 0.55, s["test_accuracy"]
    assert s["bytes_sent"] < s["updates"] * 7850 * 4 * (1 if "localsgd" not in args[1] else 2)


def test_bad_compress_spec_is_one_line(tmp_path):
    r = cli("run", "--n-proc", "1", "--compress", "zip:9", *FAST, "--out", str(tmp_path / "r"))
    assert r.exit_code == 2 and r.stderr.count("\n") == 1 and "zip:9" in r.stderr


@pytest.mark.slow
def test_compressed_replies_shrink_the_downlink_and_still_learn(tmp_path, no_orphans):
    runs = {}
    for replies in ("none", "qsgd:8"):
        out = tmp_path / replies.replace(":", "")
        proc = run_zsgd("run", "--n-proc", "2", "--algo", "async", "--steps", "300", "--compress-replies", replies, "--out", str(out), *FAST)
        assert proc.returncode == 0, proc.stderr[-2000:]
        runs[replies] = json.loads((out / "summary.json").read_text())
    dense, coded = runs["none"], runs["qsgd:8"]
    assert dense["reply_compression_ratio"] == 1.0
    # 8-bit levels plus a sign bit-plane and a norm: about 3.8x fewer bytes than float32 (only the first reply is full)
    assert 3.0 < coded["reply_compression_ratio"] < 4.0
    assert coded["bytes_received"] < dense["bytes_received"] / 3
    assert coded["test_accuracy"] > dense["test_accuracy"] - 0.03 and coded["rejected_messages"] == 0


@pytest.mark.parametrize("args, needle", [
    (["--compress-replies", "topk:2"], "top-k fraction"),
    (["--compress-replies", "zip"], "codec"),
    (["--algo", "dsgd", "--compress-replies", "topk:0.1"], "dsgd has none"),
])
def test_bad_reply_codecs_are_one_line_errors(tmp_path, args, needle):
    r = cli("run", "--n-proc", "2", "--steps", "5", "--out", str(tmp_path / "never"), *args, *FAST)
    lines = lines_of(r.stderr)
    assert r.exit_code == 2 and len(lines) == 1 and needle in lines[0], r.output
