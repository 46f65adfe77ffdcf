"""``--jobs``, ``--launcher`` and the calibration flags for commands that run many arms (``zsgd sim``, ``zsgd experiment``).

Only click is imported at start-up; the Slurm and process machinery loads
when a command runs.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import click

from zsgd.errors import ZsgdError


def arm_options(func: Callable) -> Callable:
    func = click.option("--launcher", type=click.Choice(["local", "slurm"]), default="local", show_default=True,
                        help="Where arms run: 'local' (--jobs processes here) or 'slurm' (one srun step per arm across the "
                             "allocation, as many at once as it has CPUs).")(func)
    func = click.option("--jobs", "-j", type=int, default=None,
                        help="Arms run at once, each single-threaded (default: the cores this process may use). "
                             "Results are identical to --jobs 1.")(func)
    return func


def calibration_options(func: Callable) -> Callable:
    """``--calibration FILE`` and ``--recalibrate``: where the measured figures come from (``zsgd.simulation.calibration``)."""
    func = click.option("--recalibrate", is_flag=True,
                        help="Measure the compute, broker-time and bandwidth figures again (they are cached per machine, so "
                             "the same command and seed give the same metrics) and replace the cached ones.")(func)
    func = click.option("--calibration", "calibration_file", type=click.Path(dir_okay=False), default=None, metavar="FILE",
                        help="Replay the measured figures in FILE (an arm's config.yaml, a sweep's calibration.json, or another "
                             "machine's cache file) instead of this machine's; nothing is measured.")(func)
    return func


def use_calibration(calibration_file: str | None, recalibrate: bool) -> None:
    """Check the calibration flags (a bad FILE is one line, before anything is loaded) and make them this process's."""
    from zsgd.simulation.calibration import Calibration, use

    use(Calibration.from_flags(calibration_file, recalibrate))


@dataclass
class ArmLaunch:
    """How a command runs its arms: ``jobs`` forked processes, or srun steps built by ``step_argv(out_dir, index)``."""

    jobs: int
    step_argv: Callable[[Path, int], list[str]] | None = None
    capacity: int = 1
    where: str = ""  # for the start-up line, e.g. "4 srun steps at a time in job 17"


def resolve_arm_launch(jobs: int | None, launcher: str, command: str) -> ArmLaunch:
    """Check the flags and the allocation before anything is written; ``command`` is the hidden per-arm command (``sim-arm``)."""
    from zsgd.simulation.parallel import default_jobs

    if jobs is not None and jobs < 1:
        raise ZsgdError(f"--jobs must be >= 1, got {jobs}")
    if launcher == "local":
        n = jobs or default_jobs()
        return ArmLaunch(jobs=n, where=f"{n} process(es) at a time")
    from zsgd.runtime.launch.slurm import current_allocation

    alloc = current_allocation()
    alloc.step_argv(1, "zsgd-arm")  # checks that srun is on PATH, before anything is written
    capacity = min(jobs or alloc.cpus, alloc.cpus)

    def step_argv(out_dir: Path, index: int) -> list[str]:
        return [*alloc.step_argv(1, f"zsgd-arm-{index}"), sys.executable, "-m", "zsgd", command, str(Path(out_dir).resolve()), str(index)]

    return ArmLaunch(jobs=1, step_argv=step_argv, capacity=capacity,
                     where=f"{capacity} srun step(s) at a time in Slurm job {alloc.job_id} ({len(alloc.nodes)} node(s), {alloc.cpus} CPUs)")
