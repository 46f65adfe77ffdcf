"""What every zsgd command pays before its own work: the CLI's import.

Registering the commands must not import numpy: ``single_threaded_blas`` (zsgd sim, run, worker,
experiment) sets one BLAS thread only before numpy's import, and ``zsgd run`` forks its local
workers only from a single-threaded BLAS (``zsgd.runtime.launch.forked.fork_available``). A module
that numpy slipped into at start-up left OpenBLAS spinning two threads in every simulated arm and
made ``zsgd run`` start its workers as new interpreters, with nothing failing.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

PROBE = """
import json, sys
import zsgd.cli
before = sorted(m for m in ("numpy", "numba", "scipy", "matplotlib", "zmq") if m in sys.modules)
from zsgd.runtime.threads import single_threaded_blas
import os
for key in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
    os.environ.pop(key, None)
applied = single_threaded_blas()
from zsgd.runtime.launch.forked import fork_available
print(json.dumps({"loaded": before, "applied": applied, "fork": fork_available()}))
"""


@pytest.mark.slow  # a new interpreter
def test_registering_the_commands_imports_no_numpy_numba_or_scipy():
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert out.returncode == 0, out.stderr[-2000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["loaded"] == [], f"imported while registering the commands: {got['loaded']}"
    assert got["applied"] is True  # one BLAS thread still takes effect after the CLI's import
    if sys.platform.startswith("linux"):
        assert got["fork"] is True  # so zsgd run forks its workers


def test_network_names_resolve_lazily_and_the_same():
    """``from zsgd.network import X`` gives the object the submodule defines (the package imports them on demand)."""
    import zsgd.network as net
    from zsgd.network import delays, faults, trace, units

    for name in ("Constant", "Network", "Measured", "parse_delay", "MAX_WORKERS"):
        assert getattr(net, name) is getattr(delays, name)
    assert net.FailureSpec is faults.FailureSpec and net.Trace is trace.Trace and net.parse_duration is units.parse_duration
    try:
        net.no_such_name  # noqa: B018
    except AttributeError as exc:
        assert "no_such_name" in str(exc)
    else:
        raise AssertionError("an unknown name must raise AttributeError")


NUMBA_PROBE = """
import gc, json, sys
default = gc.get_threshold()
from zsgd.commands.group import start_quickly
start_quickly()
loading = gc.get_threshold()
import numpy as np
from zsgd.nn.server_step import all_finite
from numba import njit
ok = bool(all_finite(np.ones(3, np.float32))) and not bool(all_finite(np.array([1, np.nan], np.float32)))
skipped = "scipy.linalg" not in sys.modules
gc_ok = loading[2] > 10**6 and gc.get_threshold() == default and gc.get_freeze_count() > 10_000
dot = njit(lambda a, b: np.dot(a, b))  # needs scipy's BLAS: imported now, at its compilation
print(json.dumps({"ok": ok, "skipped": skipped, "gc": gc_ok, "dot": float(dot(np.arange(3.0), np.ones(3)))}))
"""


@pytest.mark.slow  # a new interpreter
def test_numba_sets_up_without_scipy_linalg_and_jitted_blas_still_works():
    """And no full collection while loading: at numba's set-up what is loaded is frozen and the thresholds come back."""
    out = subprocess.run([sys.executable, "-c", NUMBA_PROBE], capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == {"ok": True, "skipped": True, "gc": True, "dot": 3.0}
    kept = subprocess.run([sys.executable, "-c", NUMBA_PROBE], capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL,
                          env=os.environ | {"ZSGD_NUMBA_BLAS_PROBE": "1"})
    assert json.loads(kept.stdout.strip().splitlines()[-1])["skipped"] is False  # the switch keeps numba's own probe


SIM_PROBE = """
import atexit, sys
atexit.register(lambda: print("scipy.linalg" in sys.modules, "numba.np.arraymath" in sys.modules, file=sys.stderr))
sys.argv = ["zsgd", "sim", "--model", "logreg", "--data", "embedded", "--steps", "50", "--compute", "1ms", "--broker-time", "0",
            "--broker-bandwidth", "inf", "-q", "--out", sys.argv[1]]
from zsgd.cli import main
main()
"""


@pytest.mark.slow
def test_a_short_zsgd_sim_never_imports_scipy_linalg(tmp_path):
    """The whole command as ``python -m zsgd`` runs it (its exit handlers report what it imported)."""
    out = subprocess.run([sys.executable, "-c", SIM_PROBE, str(tmp_path / "s")], capture_output=True, text=True, timeout=300,
                         stdin=subprocess.DEVNULL)
    assert out.returncode == 0, out.stderr[-2000:]
    # numba did set up (else the first answer would prove nothing), without scipy.linalg
    assert out.stderr.strip().splitlines()[-1] == "False True", out.stderr[-2000:]
