"""Rewards: \\boxed{} extraction, math-verify scoring, the user-function plugin contract, and
failures (time-outs, exceptions, bad values, dying workers) scoring 0, counted, never fatal."""

from __future__ import annotations

import os
import time

import pytest

from megarl.config import ConfigError, from_dict
from megarl.rollout.reward import RewardComputer, last_boxed, math_reward

HERE = "tests.unit.test_reward"
BASE = {"model": {"hf_dir": "/unused"}}


# user reward functions, loaded by the workers by dotted path ---------------------------------

def length_reward(response: str, answer: str, *, scale: float = 1.0) -> float:
    return scale * len(response) + (answer == "bonus")


def sleepy_reward(response: str, answer: str) -> float:
    if response == "hang":
        time.sleep(60)
    return 1.0


def broken_reward(response: str, answer: str) -> float:
    if response == "raise":
        raise ValueError("cannot score this")
    if response == "nan":
        return float("nan")
    if response == "text":
        return "high"  # type: ignore[return-value]
    if response == "die":
        os._exit(3)
    return 0.5


def first_char_parity(response: str, answer: str) -> float:
    """A reward with variance for a random model (used by the end-to-end rollout test)."""
    return float(ord(response[0]) % 2) if response else 0.0


NOT_CALLABLE = 3


# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text,expected", [
    ("so \\boxed{42}.", "42"),
    ("\\boxed{1} then \\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
    ("\\boxed{x^{2}+\\sqrt{y}}", "x^{2}+\\sqrt{y}"),
    ("final: \\fbox{7}", "7"),
    ("$\\boxed 5$", "5"),
    ("no answer", None),
    ("\\boxed{unbalanced", None),
])
def test_last_boxed(text, expected):
    assert last_boxed(text) == expected


@pytest.mark.parametrize("response,answer,expected", [
    ("The answer is \\boxed{\\frac{1}{2}}", "0.5", 1.0),
    ("\\boxed{0.5}", "\\frac12", 1.0),
    ("\\boxed{2x+1}", "1+2x", 1.0),
    ("\\boxed{3}", "4", 0.0),
    ("I think 4", "4", 0.0),  # no \boxed{}: no answer
    ("\\boxed{4}", "\\boxed{4}", 1.0),
    ("\\boxed{\\text{blue}}", "\\text{blue}", 1.0),
])
def test_math_reward(response, answer, expected):
    assert math_reward(response, answer) == expected


def test_math_rewards_in_workers():
    with RewardComputer("math", timeout_s=20, num_workers=2) as scorer:
        result = scorer.score(["\\boxed{6}", "\\boxed{7}", "none", "\\boxed{\\frac{6}{1}}"],
                              ["6", "6", "6", "6"])
    assert result.rewards == [1.0, 0.0, 0.0, 1.0]
    assert result.num_timeouts == result.num_errors == 0


def test_user_function_contract():
    """A user function gets (response, answer, **reward.options) and returns a real number."""
    config = from_dict({**BASE, "reward": {"function": f"{HERE}:length_reward",
                                           "options": {"scale": 2.0}}})
    with RewardComputer.from_config(config.reward) as scorer:
        result = scorer.score(["ab", "abc"], ["x", "bonus"])
    assert result.rewards == [4.0, 7.0]
    for bad, match in ((f"{HERE}:NOT_CALLABLE", "not callable"), (f"{HERE}:missing", "no attribute"),
                       ("no_such_module_xyz:f", "cannot import")):
        with pytest.raises(ConfigError, match=match):
            from_dict({**BASE, "reward": {"function": bad}})


def test_a_reward_that_never_returns_times_out_scores_zero_and_is_counted():
    with RewardComputer(f"{HERE}:sleepy_reward", timeout_s=1.0, num_workers=2) as scorer:
        start = time.monotonic()
        result = scorer.score(["ok", "hang", "ok", "ok"], ["", "", "", ""])
        elapsed = time.monotonic() - start
        assert result.rewards == [1.0, 0.0, 1.0, 1.0]
        assert result.num_timeouts == 1 and result.num_errors == 0
        assert "response 1" in result.messages[0] and "timeout" in result.messages[0]
        assert elapsed < 30   # far below the 60 s hang, with room for a loaded machine
        # the killed worker was replaced: the pool keeps working
        assert scorer.score(["ok"] * 3, [""] * 3).rewards == [1.0] * 3
        assert scorer.total_timeouts == 1


def test_exceptions_bad_values_and_dead_workers_score_zero_and_are_counted():
    responses = ["fine", "raise", "nan", "text", "die", "fine"]
    with RewardComputer(f"{HERE}:broken_reward", timeout_s=20, num_workers=2) as scorer:
        result = scorer.score(responses, [""] * len(responses))
        assert result.rewards == [0.5, 0.0, 0.0, 0.0, 0.0, 0.5]
        assert result.num_errors == 4 and result.num_timeouts == 0
        text = "\n".join(result.messages)
        assert "cannot score this" in text and "not a finite real number" in text
        assert "exit code 3" in text
        assert scorer.score(["fine"], [""]).rewards == [0.5]


def test_mismatched_lengths_are_a_programming_error():
    with RewardComputer("math", num_workers=1) as scorer, pytest.raises(ValueError):
        scorer.score(["a"], [])
