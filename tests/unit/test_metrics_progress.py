"""The progress display: plain periodic lines off a terminal, a live bar on one."""

from __future__ import annotations

import io

import pytest

from megarl.config import LoggingConfig
from megarl.metrics import Progress, step_status
from megarl.metrics.progress import format_duration, live_enabled


class FakeTerminal(io.StringIO):
    def isatty(self):
        return True


def test_plain_lines_every_interval_with_status():
    stream = io.StringIO()
    cfg = LoggingConfig(progress="auto", log_interval=2)
    with Progress.from_config(cfg, total=5, desc="train", stream=stream) as progress:
        assert not progress.live  # a StringIO is not a terminal
        for step in range(1, 6):
            metrics = {"reward/mean": 0.1 * step, "entropy/mean": 1.0 / step,
                       "time/rollout": 2.0, "time/train": 3.25, "cov/mean": 9.0}
            progress.advance(1, step_status(metrics))
    lines = stream.getvalue().splitlines()
    # Steps 2 and 4 by the interval, 5 because the run ends there.
    assert [line.split(" | ")[0] for line in lines] == [
        "train: step 2/5 (40%)", "train: step 4/5 (80%)", "train: step 5/5 (100%)"]
    assert "reward 0.2 | entropy 0.5 | rollout 2.0s | train 3.2s" in lines[0]
    assert "cov" not in lines[0] and "eta" in lines[0] and "eta" not in lines[-1]


def test_resumed_run_counts_from_its_first_step():
    stream = io.StringIO()
    progress = Progress(10, desc="train", mode="off", initial=7, stream=stream)
    progress.advance(1)
    assert stream.getvalue().startswith("train: step 8/10 (80%)")


def test_live_bar_on_a_terminal_and_when_forced():
    terminal = FakeTerminal()
    with Progress(3, desc="eval", unit="problem", mode="auto", stream=terminal) as progress:
        assert progress.live
        progress.advance(2, {"benchmark": "aime24"})
    assert "eval" in terminal.getvalue() and "2/3" in terminal.getvalue()
    assert "benchmark aime24" in terminal.getvalue()
    assert live_enabled("on", io.StringIO()) and not live_enabled("off", FakeTerminal())
    with pytest.raises(ValueError, match="'sometimes'"):
        live_enabled("sometimes", terminal)


def test_disabled_progress_prints_nothing():
    stream = FakeTerminal()
    progress = Progress(3, desc="x", mode="on", enabled=False, stream=stream)
    progress.advance(3)
    progress.close()
    assert stream.getvalue() == ""


def test_unknown_total_and_durations():
    stream = io.StringIO()
    Progress(None, desc="convert", unit="tensor", mode="off", stream=stream).advance(3)
    assert stream.getvalue().startswith("convert: tensor 3 | ")
    assert [format_duration(s) for s in (12, 455, 3720)] == ["12s", "7m35s", "1h02m"]


def test_progress_config_accepts_yaml_booleans():
    assert LoggingConfig(progress="False").progress == "off"
    assert LoggingConfig(progress="True").progress == "on"
