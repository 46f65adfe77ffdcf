"""zsgd on a real one-node Slurm cluster (``slurm_cluster.py``): the cluster itself,
``zsgd run`` inside an allocation, batch jobs cut by a signal and resumed."""

from __future__ import annotations

import pytest

from slurm_cluster import slurm  # noqa: F401  (the session fixture)

pytestmark = pytest.mark.slow


def test_cluster_grants_more_tasks_than_cores(slurm):
    """config_overrides + CPUs=8: a 2-core machine grants 4 tasks, and the step runs them all."""
    out = slurm.client(["salloc", "-n", "4", "srun", "hostname"], timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [slurm.node] * 4
    slurm.wait_idle()
