"""metrics.jsonl as MetricsWriter writes it: the text of ``json.dumps`` with compact separators, NaN as null,
numpy scalars unwrapped; line by line, or flushed at most every ``flush_every_s`` with the same content."""

import json
import math

import numpy as np

from zsgd.output.metrics import MetricsWriter, read_metrics

EVENTS = [
    ("start", 0.0, {"mode": "sim", "nested": {"a": [1, 2.5, None]}, "flag": True, "text": "é"}),
    ("update", 0.1234567891, {"updates": 1, "samples": 64, "worker": 3, "staleness": 0, "lr": 0.01, "bytes": 31400}),
    ("train", 1.5, {"loss": math.nan, "inf": math.inf, "np_float": np.float32(0.25), "np_int": np.int64(7), "np_nan": np.float64("nan")}),
    ("eval", 2.0, {"test_acc": np.float64(0.5), "big": 2**70, "none": None, "neg": -math.inf}),
]


def _expected_line(event: str, t: float, fields: dict) -> str:
    """What the writer wrote before it kept its encoder and cleaned plain values on a fast path."""
    def clean(v):
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if hasattr(v, "item") and not isinstance(v, (list, dict)):
            return clean(v.item())
        return v

    record = {"event": event, "t": round(float(t), 6)} | {k: clean(v) for k, v in fields.items()}
    return json.dumps(record, separators=(",", ":")) + "\n"


def test_lines_are_the_compact_json_of_each_event(tmp_path):
    for flush in (None, 0.5):
        path = tmp_path / f"m-{flush}.jsonl"
        with MetricsWriter(path, flush_every_s=flush) as metrics:
            for event, t, fields in EVENTS:
                metrics.write(event, t, **fields)
        assert path.read_text() == "".join(_expected_line(*e) for e in EVENTS)
        assert [e["event"] for e in read_metrics(path)] == ["start", "update", "train", "eval"]


def test_buffered_writer_flushes_on_its_interval_and_on_close(tmp_path):
    path = tmp_path / "metrics.jsonl"
    metrics = MetricsWriter(path, flush_every_s=3600.0)
    metrics.write("update", 0.0, updates=1)
    assert path.read_text() == ""  # held until the interval passes (or the writer closes)
    metrics._flush_every = 0.0
    metrics.write("update", 0.1, updates=2)
    assert path.read_text().count("\n") == 2
    metrics._flush_every = 3600.0
    metrics.write("end", 0.2, updates=2)
    metrics.close()
    assert [e["updates"] for e in read_metrics(path)] == [1, 2, 2]


def test_line_buffered_writer_writes_each_event_at_once(tmp_path):
    path = tmp_path / "metrics.jsonl"
    with MetricsWriter(path) as metrics:
        metrics.write("update", 0.0, updates=1)
        assert path.read_text().count("\n") == 1  # a run killed now keeps it
