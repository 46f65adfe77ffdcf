"""--tensorboard mirrors the run's scalars into TensorBoard event files."""

from __future__ import annotations

import struct

import pytest

from helpers import run_zsgd


def read_scalars(path):
    from tensorboardX.proto import event_pb2

    scalars = {}
    data = path.read_bytes()
    pos = 0
    while pos < len(data):
        (length,) = struct.unpack_from("<Q", data, pos)
        record = data[pos + 12: pos + 12 + length]  # u64 length, u32 crc, payload, u32 crc
        pos += 12 + length + 4
        event = event_pb2.Event()
        event.ParseFromString(record)
        for v in event.summary.value:
            scalars.setdefault(v.tag, []).append((event.step, v.simple_value))
    return scalars


@pytest.mark.slow
def test_run_writes_tensorboard_scalars(tmp_path, no_orphans):
    pytest.importorskip("tensorboardX")
    out = tmp_path / "run"
    proc = run_zsgd("run", "--no-plots", "--n-proc", "2", "--model", "logreg", "--data", "embedded", "--steps", "200", "--eval-every", "100",
                    "--tensorboard", "--quiet", "--heartbeat", "0.5", "--timeout", "3", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    (events,) = list((out / "tensorboard").glob("events.out.tfevents.*"))
    scalars = read_scalars(events)
    assert {"train/loss", "test/accuracy", "test/loss", "staleness"} <= set(scalars)
    steps = [step for step, _ in scalars["test/accuracy"]]
    assert steps[-1] == 200 and steps == sorted(steps)  # the final evaluation is always there
    assert all(0.0 <= acc <= 1.0 for _, acc in scalars["test/accuracy"])
