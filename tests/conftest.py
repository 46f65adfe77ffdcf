"""Pytest fixtures and hooks: nothing left behind, data sets isolated, repeatable property tests.

The helpers the tests share (starting zsgd, reading a run, waiting on a
condition) live in ``helpers.py``.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import time
from pathlib import Path

# One BLAS thread in this process too, as zsgd gives its own (zsgd.runtime.threads): the tests run
# simulations and trainers in-process next to worker processes, and on two cores a second OpenBLAS
# thread busy-waits against them (an in-process simulation ran several times slower than 'zsgd sim').
if "numpy" not in sys.modules:
    for _key, _value in (("OMP_NUM_THREADS", "1"), ("OPENBLAS_NUM_THREADS", "1"), ("MKL_NUM_THREADS", "1"), ("NUMBA_NUM_THREADS", "1")):
        os.environ.setdefault(_key, _value)

# A suite started in the background of a non-interactive shell (``pytest &``) inherits SIGINT ignored,
# and so would every zsgd process it starts: the Ctrl-C tests would wait out their deadline on a run
# that cannot hear them. A Python handler here is reset to the default in every child at exec.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

import pytest
from hypothesis import settings

from helpers import zsgd_processes
from serial_files import SERIAL_FILES  # timing-sensitive files: scripts/test.sh's second pass
# The session's shared clusters, defined here once: a fixture imported into two test modules is two fixtures, and
# each module started (and prepared) its own cluster.
from slurm_cluster import slurm  # noqa: F401
from sshd import prepared_hosts  # noqa: F401

# Property tests draw the same examples on every run by default, so CI cannot fail
# on a draw nobody saw before; ZSGD_HYPOTHESIS=explore draws fresh ones (do that
# when changing a tested module, and pin what it finds as an explicit case).
settings.register_profile("repeatable", derandomize=True, print_blob=True)
settings.register_profile("explore", derandomize=False, print_blob=True)
settings.load_profile(os.environ.get("ZSGD_HYPOTHESIS", "repeatable"))


# The files about drawing figures: their tests, and any test named for a plot or a figure, draw every PNG.
FIGURE_FILES = frozenset({"test_plotter.py", "test_against_plot.py", "test_sweep_figures.py", "test_headline.py"})

# Session-wide daemons: every test that needs one goes to the same pytest-xdist worker (``--dist loadgroup``), so
# the cluster starts once, as in a serial run, and not once per worker.
SHARED_DAEMONS = ("slurm", "prepared_hosts")


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist's own, which reads the xdist_group marks set here into the node ids
def pytest_collection_modifyitems(config, items):
    """A test that starts zsgd processes (it asks for ``no_orphans``) is slow: ``-m "not slow"`` must skip it.
    Timing-sensitive files are marked ``serial``, the figure tests ``figures``; tests on a shared daemon are grouped by
    it."""
    unmarked = [item.nodeid for item in items if "no_orphans" in getattr(item, "fixturenames", ()) and item.get_closest_marker("slow") is None]
    if unmarked:
        raise pytest.UsageError("multi-process tests without @pytest.mark.slow: " + ", ".join(unmarked))
    for item in items:
        if item.path.name in SERIAL_FILES:
            item.add_marker(pytest.mark.serial)
        if item.path.name in FIGURE_FILES or any(word in item.name for word in ("plot", "figure")):
            item.add_marker(pytest.mark.figures)
        daemon = next((d for d in SHARED_DAEMONS if d in getattr(item, "fixturenames", ())), None)
        if daemon is not None:
            item.add_marker(pytest.mark.xdist_group(daemon))
    if os.environ.get("PYTEST_XDIST_WORKER"):
        # Under pytest-xdist, the groups go out first (the scheduler sends the largest units first) and then single
        # tests in this order: the slow ones first, so that the last to finish are short and no core waits idle at
        # the end. Every worker sorts the same collection the same way (a stable sort), as the scheduler requires.
        items.sort(key=lambda item: item.get_closest_marker("slow") is None)


@pytest.fixture(scope="session", autouse=True)
def _calibration_cache(tmp_path_factory):
    """The simulator's calibration cache (``zsgd.simulation.calibration``) in a folder of this session, never the
    user's: tests share its figures as runs on one machine do; a test of the cache points it elsewhere itself."""
    previous = os.environ.get("ZSGD_CALIBRATION_DIR")
    os.environ["ZSGD_CALIBRATION_DIR"] = str(tmp_path_factory.mktemp("calibration"))
    yield
    if previous is None:
        os.environ.pop("ZSGD_CALIBRATION_DIR", None)
    else:
        os.environ["ZSGD_CALIBRATION_DIR"] = previous


@pytest.fixture(scope="session", autouse=True)
def _matplotlib_loaded():
    """matplotlib imported (Agg) and its fonts loaded once in this process. Every in-process sweep, experiment or run
    forks plot helpers (``zsgd.output.plotter``) that import it first, 0.4 s of CPU each; forked from here they start
    with it loaded, as a run's later helpers start from its first one (the same warm-up). What they draw is unchanged."""
    from zsgd.output.plotter import _warm_up

    _warm_up()


# A valid 1x1 PNG: what a figure's file holds in a test that does not look at the figure.
_PLACEHOLDER_PNG = bytes.fromhex("89504e470d0a1a0a0000000d4948445200000001000000010806000000"
                                 "1f15c4890000000d49444154789c6360000002000154a24f5d0000000049454e44ae426082")


def _placeholder_savefig(self, fname, *args, **kwargs) -> None:
    if hasattr(fname, "write"):
        fname.write(_PLACEHOLDER_PNG)
    else:
        Path(fname).write_bytes(_PLACEHOLDER_PNG)


@pytest.fixture(scope="module", autouse=True)
def _figures_not_drawn(request):
    """Outside the figure files, a figure is built (its data, axes, scales and labels set, where a bad value fails)
    but not drawn: ``Figure.savefig`` writes a 1x1 PNG, in this process (no plot helpers are forked:
    ``zsgd.output.plotter`` draws here, as with ``ZSGD_PLOT_FORK=0``). Every in-process ``zsgd sim`` forked two
    helpers first thing (this process is large: 10-15 ms for each fork, and a test of bad input forks them for
    nothing) and drew five PNGs (0.19 s of CPU for a two-arm sweep's pair of curve figures, 0.02 s without the
    drawing): about a seventh of the inner loop's CPU, in tests that read the table or the run files. Module-scoped,
    so that a module's shared runs (its module fixtures) are made the same way; the figure tests draw every pixel
    (``_figure_tests_draw``)."""
    if request.path.name in FIGURE_FILES:
        yield
        return
    from matplotlib.figure import Figure

    from zsgd.output import plotter

    with pytest.MonkeyPatch.context() as patch:
        _REAL_FIGURES.update(savefig=Figure.savefig, fork_available=plotter.fork_available)
        patch.setattr(Figure, "savefig", _placeholder_savefig)
        patch.setattr(plotter, "fork_available", lambda: False)
        yield


_REAL_FIGURES: dict = {}  # what _figures_not_drawn replaced


@pytest.fixture(autouse=True)
def _figure_tests_draw(request, monkeypatch):
    """A test named for a plot or a figure (marked ``figures``) in another file forks the plot helpers and draws
    every pixel, as the real commands always do."""
    if request.node.get_closest_marker("figures") is not None and request.path.name not in FIGURE_FILES:
        from matplotlib.figure import Figure

        from zsgd.output import plotter

        monkeypatch.setattr(Figure, "savefig", _REAL_FIGURES["savefig"])
        monkeypatch.setattr(plotter, "fork_available", _REAL_FIGURES["fork_available"])
    yield


@pytest.fixture(autouse=True)
def _default_calibration():
    """Each test starts with the default calibration (this machine's cache): an in-process ``zsgd sim
    --calibration FILE`` or ``--recalibrate`` sets the process's, which must not leak into the next test."""
    yield
    from zsgd.simulation import calibration

    calibration.use(None)


@pytest.fixture
def no_orphans():
    """Fail the test if it leaves any zsgd process running; kill them so later tests are clean."""
    before = zsgd_processes()
    yield
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and zsgd_processes() - before:
        time.sleep(0.2)
    left = zsgd_processes() - before
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert not left, f"stray zsgd processes left running: {sorted(left)}"


@pytest.fixture(scope="session")
def _decoded_embedded(tmp_path_factory) -> Path:
    """The embedded set's decoded cache file (``zsgd.data.embedded``), decoded once per session: its xz arrays
    take a quarter of a second of CPU to decode, and a fresh ZSGD_HOME per test paid that in every test."""
    from zsgd.data.embedded import read_embedded_arrays

    home = tmp_path_factory.mktemp("embedded-home")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("ZSGD_HOME", str(home))
        read_embedded_arrays()
    (decoded,) = (home / "data" / "embedded").glob("*.npz")
    return decoded


@pytest.fixture
def fresh_home(tmp_path, monkeypatch, _decoded_embedded) -> Path:
    """ZSGD_HOME in a fresh folder of this test (nothing of the user's cache is seen), holding only the embedded
    set's decoded cache, as every home does after its first zsgd command. Linked, not copied: zsgd replaces a cache
    file (temp file and rename), never writes into it, so a test cannot change the session's copy through its link."""
    home = tmp_path / "zsgd-home"
    cache = home / "data" / "embedded"
    cache.mkdir(parents=True)
    try:
        os.link(_decoded_embedded, cache / _decoded_embedded.name)
    except OSError:  # another file system
        shutil.copyfile(_decoded_embedded, cache / _decoded_embedded.name)
    monkeypatch.setenv("ZSGD_HOME", str(home))
    return home


@pytest.fixture
def isolated_data(tmp_path, monkeypatch, fresh_home):
    """Data sets resolve in a fresh ZSGD_HOME, and the system's Fashion-MNIST copy is out of sight."""
    import zsgd.data.datasets as datasets

    monkeypatch.setattr(datasets, "SYSTEM_FASHION_MNIST_DIR", tmp_path / "no-system-dir")
