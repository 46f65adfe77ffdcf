"""Figures drawn by helpers forked while the work runs (zsgd.output.plotter): the same results as drawn here."""

from __future__ import annotations

import os
import signal

import pytest

from zsgd.errors import ZsgdError
from zsgd.output.plotter import Plotter


def _pid_and(value):
    return os.getpid(), value


def _fail(message):
    raise ZsgdError(message)


def _bug():
    return 1 / 0


def test_jobs_run_in_the_helpers_side_by_side_and_return_their_results():
    with Plotter(2) as plotter:
        first, second = plotter.submit(_pid_and, "a"), plotter.submit(_pid_and, value="b")
        third = plotter.submit(_pid_and, "c")  # no helper left: drawn here
        (p1, v1), (p2, v2), (p3, v3) = first(), second(), third()
    assert (v1, v2, v3) == ("a", "b", "c")
    assert p3 == os.getpid() and len({p1, p2, os.getpid()}) == 3


def test_a_users_error_is_raised_here_and_a_bug_names_its_traceback():
    with Plotter(2) as plotter:
        failed, bug = plotter.submit(_fail, "nothing to plot"), plotter.submit(_bug)
        with pytest.raises(ZsgdError, match="nothing to plot"):
            failed()
        with pytest.raises(RuntimeError, match="ZeroDivisionError"):
            bug()


def test_a_job_that_cannot_be_sent_is_run_here(monkeypatch):
    with Plotter(1) as plotter:
        assert plotter.submit(lambda: os.getpid())() == os.getpid()  # a lambda does not pickle
    monkeypatch.setenv("ZSGD_PLOT_FORK", "0")
    with Plotter(2) as plotter:
        assert plotter.submit(_pid_and, 1)() == (os.getpid(), 1)


def test_closing_unused_helpers_leaves_no_process():
    plotter = Plotter(2)
    proc = plotter._proc
    plotter.close()
    assert proc is not None and proc.exitcode is not None


def _loaded(name):
    import sys

    return name in sys.modules


def test_helpers_import_the_preloaded_modules_while_they_wait(tmp_path, monkeypatch):
    name = "zsgd_plotter_preload_probe"
    (tmp_path / f"{name}.py").write_text("VALUE = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with Plotter(1, preload=(name,)) as plotter:
        assert plotter.submit(_loaded, name)() is True
    with Plotter(1) as plotter:
        assert plotter.submit(_loaded, name)() is False
    assert not _loaded(name)  # imported in the helpers only


def test_an_error_before_any_job_ends_the_helpers_without_waiting_for_their_warm_up():
    """A command that fails early (a bad flag found after the helpers were forked) must not wait for matplotlib
    to load: the warming child is terminated, where it used to be joined until it had finished. The parent's own
    SIGTERM handler (zsgd sim's stop_on_signals only sets a flag) is not the helper's."""
    previous = signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        with pytest.raises(ZsgdError, match="bad flag"):
            with Plotter(2) as plotter:
                proc = plotter._proc
                raise ZsgdError("bad flag")
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert proc is not None and proc.exitcode == -signal.SIGTERM
