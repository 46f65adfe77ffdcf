"""The simulator: the entry point of zsgd's virtual-time side.

``zsgd sim`` runs the server rules and worker steps of a real run against an
event queue and a virtual clock, with real gradients; the simulator itself
lives in ``zsgd.simulation.simulator``, its network and straggler models,
calibration and sweeps beside it. This module names what a user of the
library needs (run one arm, or build a ``Simulation``), and nothing in the
package imports it back.
"""

from __future__ import annotations

from zsgd.simulation.simulator import SimOptions, SimResult, Simulation, Workload, record_arm, run_arm

__all__ = ["SimOptions", "SimResult", "Simulation", "Workload", "record_arm", "run_arm"]
