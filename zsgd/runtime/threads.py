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
