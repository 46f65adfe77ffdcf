"""One BLAS thread per process where parallelism comes from processes.

Workers and the simulator (whose measured compute stands for a worker's)
run one BLAS thread: OpenBLAS threads busy-wait, and a few processes each
spinning two threads on a two-core machine run several times slower than
one thread each. Must run before numpy is first imported; an explicit
setting in the environment wins.
"""

from __future__ import annotations

import os
import sys

SINGLE_THREAD_ENV = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "NUMBA_NUM_THREADS": "1"}


def single_threaded_blas() -> bool:
    """Set the thread variables unless numpy is already loaded; True if they apply."""
    if "numpy" in sys.modules:
        return False
    for key, value in SINGLE_THREAD_ENV.items():
        os.environ.setdefault(key, value)
    return True


def blas_single_threaded() -> bool:
    """True when numpy in this process runs one BLAS thread: the thread settings are in the
    environment (zsgd sets them only before numpy is imported). A child forked from this process
    inherits its BLAS as it is, so launchers fork only then."""
    if "numpy" not in sys.modules:
        return True
    return all(os.environ.get(key) == "1" for key in SINGLE_THREAD_ENV)
