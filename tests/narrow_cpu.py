"""Run a snippet of Python in a process whose numba compiles for a CPU without AVX-512 (an AVX2 Haswell),
with a cache of its own: the kernels' narrow tiles (8-float vectors) are then what runs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from helpers import REPO

HASWELL_FEATURES = ("+64bit,+avx,+avx2,+bmi,+bmi2,+cmov,+cx16,+f16c,+fma,+fxsr,+lzcnt,+mmx,+movbe,+popcnt,"
                    "+sse,+sse2,+sse3,+sse4.1,+sse4.2,+ssse3,+xsave")


def run_without_avx512(code: str, workdir: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    """``python -c code`` in ``workdir`` with numba targeting Haswell (no AVX-512) and a cache under ``workdir``."""
    env = dict(os.environ, NUMBA_CPU_NAME="haswell", NUMBA_CACHE_DIR=str(Path(workdir) / "numba-cache"),
               NUMBA_CPU_FEATURES=HASWELL_FEATURES,
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout, env=env, cwd=workdir)
