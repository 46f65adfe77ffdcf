"""Ctrl-C and SIGTERM end a run through its stop rule, not through an exception landing anywhere."""

from __future__ import annotations

import os
import signal

import pytest

from zsgd.runtime import stop_signal


class _Ledger:
    def __init__(self) -> None:
        self.stop_reason = None

    def stop(self, reason: str) -> None:
        self.stop_reason = self.stop_reason or reason


class _Broker:
    def __init__(self) -> None:
        self.ledger = _Ledger()


def test_first_ctrl_c_sets_the_stop_reason_the_second_raises():
    before = signal.getsignal(signal.SIGINT)
    broker = _Broker()
    stop_signal.stop_on_signals(broker.ledger, show=False)
    try:
        os.kill(os.getpid(), signal.SIGINT)  # handled on the main thread before the next line runs
        assert broker.ledger.stop_reason == "interrupted" and stop_signal.interrupted()
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    finally:
        stop_signal.stop_on_signals(None)
    assert signal.getsignal(signal.SIGINT) is before


def test_sigterm_stops_with_a_checkpoint_and_is_no_interruption():
    before = signal.getsignal(signal.SIGTERM)
    broker = _Broker()
    stop_signal.stop_on_signals(broker.ledger, show=False)
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        assert broker.ledger.stop_reason.startswith("stopped by SIGTERM") and not stop_signal.interrupted()
    finally:
        stop_signal.stop_on_signals(None)
    assert signal.getsignal(signal.SIGTERM) is before
