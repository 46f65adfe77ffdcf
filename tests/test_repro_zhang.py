"""Study (c): Zhang, Gupta, Lian & Liu, IJCAI 2016, "Staleness-aware Async-SGD for Distributed Deep
Learning" (docs/reproductions.md).

The study's file (examples/repro/zhang2016_staleness.yaml), made small: the embedded data, 4 and 32
learners. At an equal number of epochs, async SGD with the base rate degrades as learners grow; with the
rate divided by each gradient's staleness (``staleness_lr: scalar``) it stays close to synchronous SGD.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from helpers import cli

REPRO = Path(__file__).resolve().parent.parent / "examples" / "repro"


@pytest.mark.slow
def test_staleness_aware_rate_stays_close_to_sync(tmp_path):
    doc = yaml.safe_load((REPRO / "zhang2016_staleness.yaml").read_text())
    doc["problem"]["data"] = "embedded"
    doc["arms"] = [a for a in doc["arms"] if a["workers"] in (4, 32)]
    path = tmp_path / "zhang.yaml"
    path.write_text(yaml.safe_dump(doc))
    out = tmp_path / "out"
    result = cli("experiment", str(path), "--out", str(out), "--quiet", "--jobs", "1")
    assert result.exit_code == 0, result.stderr[-2000:]
    acc = {p.name.split("-", 1)[1]: json.loads((p / "summary.json").read_text())["test_accuracy"]
           for p in sorted(out.iterdir()) if (p / "summary.json").exists()}
    assert len(acc) == 6, acc
    for n in (4, 32):
        assert abs(acc[f"async-slr-{n}"] - acc[f"sync-{n}"]) < 0.08, (n, acc)  # staleness-aware: close to sync
    assert acc["async-32"] < acc["async-4"] - 0.15, acc  # the fixed rate degrades with the learners
    assert acc["async-32"] < acc["sync-32"] - 0.10, acc  # ... and falls well below sync
    assert acc["async-32"] < acc["async-slr-32"] - 0.10, acc
