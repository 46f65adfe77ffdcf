"""Arms of one sweep whose batch sizes differ (scaled per workers) get a workload each, and share its shards:
cutting them copies the training set, which an arm used to do again in every process that ran one."""

from __future__ import annotations

import numpy as np

from zsgd.core.config import TrainConfig
from zsgd.core.problem import Problem
from zsgd.simulation.simulator import Workload


def _workloads(**other):
    cfg = TrainConfig(model="logreg", data="embedded", batch_size=64, steps=10).validate()
    problem = Problem.from_config(cfg)
    first = Workload(cfg, problem)
    second = Workload(TrainConfig(**(cfg.to_dict() | {"batch_size": 16} | other)).validate(), problem)
    return first, second


def test_a_workload_of_another_batch_size_uses_the_shards_already_cut():
    first, second = _workloads()
    cut = first.shards(4)
    second.share_shards(first)
    assert second.shards(4) is cut and second.shards(8) is first.shards(8)  # one cut per worker count, whoever asks first


def test_shards_of_another_seed_or_split_are_cut_again():
    for other in ({"seed": 1}, {"split": "shards"}):
        first, second = _workloads(**other)
        second.share_shards(first)
        own = second.shards(4)
        assert own is not first.shards(4)
        assert any(not np.array_equal(a[1], b[1]) for a, b in zip(own, first.shards(4)))
