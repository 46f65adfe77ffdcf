"""A worker's id from the launcher that started it (Slurm, Open MPI, MPICH/Hydra).

``zsgd worker --connect ADDR`` without ``--id`` takes its id from the rank
the launcher gave the process, so ``srun zsgd worker ...``, ``mpirun -n 8
zsgd worker ...`` or a site's own PMI launcher start a numbered set of
workers for one ``zsgd broker`` with no per-process command line.

Why this order (Open MPI, then PMI, then Slurm): inside a batch job every
process inherits the batch step's ``SLURM_PROCID=0``; an ``mpirun`` started
from that script sets ``OMPI_COMM_WORLD_RANK`` (or Hydra's ``PMI_RANK``) on
each of its processes but leaves the inherited ``SLURM_PROCID`` alone. The
variable of the launcher closest to the process comes first; under plain
``srun`` only ``SLURM_PROCID`` is set (or ``PMI_RANK`` with the same value).
"""

from __future__ import annotations

import os
from typing import Mapping

from zsgd.errors import ZsgdError

RANK_VARIABLES = ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "SLURM_PROCID")
#: The largest worker id: the wire header carries ids in [-1, 2**31) (zsgd.wire.frames), so a larger one
#: would be a protocol error at the first message instead of a usage error at the command line.
MAX_WORKER_ID = 2**31 - 1


def rank_from_env(environ: Mapping[str, str] | None = None) -> tuple[int, str] | None:
    """``(rank, variable)`` from the first rank variable that is set, or None when none is.

    A set variable that is not a whole number >= 0 is a ``ZsgdError`` (one line,
    exit 2): silently falling back to "the broker picks" would give every
    process of the launch the same fate and hide the mistake."""
    env = os.environ if environ is None else environ
    for name in RANK_VARIABLES:
        value = env.get(name)
        if value is None:
            continue
        text = value.strip()
        if not (text.isascii() and text.isdigit()) or int(text) > MAX_WORKER_ID:
            raise ZsgdError(f"{name}={value[:40]!r} is not a rank (expected a whole number in 0..{MAX_WORKER_ID}); "
                            f"pass --id or unset {name}")
        return int(text), name
    return None
