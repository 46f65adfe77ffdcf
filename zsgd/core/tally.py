"""One worker's counters, as every driver keeps them: the broker on its peers, the simulator on its workers.

The server engine (``zsgd.engine``) books into these when an update is
accepted and when it is applied, so a real run's ``workers`` block in
summary.json and a simulated one's are counted by the same code and have
the same keys.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(kw_only=True)
class WorkerTally:
    steps: int = 0  # updates of this worker the model took (a round counts once per contributor)
    samples: int = 0
    staleness_sum: int = 0
    staleness_max: int = 0
    last_loss: float = float("nan")  # the train loss of its latest accepted gradient (booked when that is applied)
    last_samples: int = 0  # the samples of that gradient (a round books them when it is applied)
    compute_s_sum: float = 0.0  # worker-reported gradient time (without emulated slowdown)
    incarnations: int = 1

    @property
    def mean_staleness(self) -> float:
        return self.staleness_sum / self.steps if self.steps else 0.0

    def row(self, host: str) -> dict[str, Any]:
        """This worker's entry in the summary's ``workers`` block."""
        return {"host": host, "steps": self.steps, "samples": self.samples, "mean_staleness": self.mean_staleness,
                "max_staleness": self.staleness_max, "incarnations": self.incarnations}
