"""How the trainer reacts to stop signals: the first asks for a clean stop (finish the step,
checkpoint, exit); repeated SIGTERMs, which launchers forward on top of the scheduler's own, do
not cut that short; a second SIGINT (Ctrl-C twice) interrupts at once."""

from __future__ import annotations

import signal
from types import SimpleNamespace

import pytest

from megarl.trainer.trainer import Trainer


def test_repeated_sigterm_keeps_the_clean_stop_and_a_second_sigint_interrupts():
    trainer = SimpleNamespace(_stop=False,
                              _previous_handlers={signal.SIGINT: signal.default_int_handler})
    Trainer._request_stop(trainer, signal.SIGTERM, None)
    assert trainer._stop
    Trainer._request_stop(trainer, signal.SIGTERM, None)   # ignored: still a clean stop
    assert trainer._stop
    installed = signal.getsignal(signal.SIGINT)
    try:
        with pytest.raises(KeyboardInterrupt):
            Trainer._request_stop(trainer, signal.SIGINT, None)
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, installed)
