"""Final answers of responses: their verdicts, and the grouping of equal answers for voting.

The verdict is the training reward's (`megarl.rollout.reward.math_reward`): the last
`\\boxed{...}` of the response, compared with the reference by math-verify; a response without
a box is wrong. Using the same rule keeps evaluation figures and training reward comparable.

For majority voting, the boxed answer is normalised by math-verify into a sympy object, so
`\\dfrac12`, `0.5` and `1/2` are the same answer; answers whose normal forms differ are still
merged when math-verify judges them equal. All correct answers of a problem form one group: each
equals the reference, so they equal each other, and grouping them by that fact keeps maj@k
consistent with the per-sample verdicts where math-verify's tolerant comparison is not
transitive. Wrong answers are grouped among themselves; responses without a box do not vote.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, Optional, Sequence

_TIMEOUT_S = 5


@dataclass(frozen=True)
class ScoredSample:
    """One response's extracted answer and verdict."""

    answer: Optional[str]
    """The content of the response's last \\boxed{} (None when it has none)."""

    correct: bool
    """The verdict: the training reward's math check scored it 1."""

    cluster: Optional[int]
    """Group of equal answers this one belongs to for majority voting (None: no answer)."""


def _timeout() -> Optional[int]:
    # math-verify's time limit uses SIGALRM, which only the main thread may set.
    return _TIMEOUT_S if threading.current_thread() is threading.main_thread() else None


def normal_form(answer: str) -> list[Any]:
    """math-verify's reading of a boxed answer ([] when it cannot read it)."""
    from math_verify import parse

    return parse("\\boxed{" + answer + "}", parsing_timeout=_timeout())


def equal(a: list[Any], b: list[Any]) -> bool:
    """math-verify's verdict on two read answers; False when either is unreadable."""
    from math_verify import verify

    if not a or not b:
        return False
    return bool(verify(a, b, timeout_seconds=_timeout()))


def verdicts(responses: Sequence[str], reference: str) -> list[bool]:
    """The training reward's verdict on each response (in this process)."""
    from megarl.rollout.reward import math_reward

    return [math_reward(r, reference) == 1.0 for r in responses]


def score_samples(responses: Sequence[str], reference: str,
                  correct: Optional[Sequence[bool]] = None) -> list[ScoredSample]:
    """Extract and group the answers of one problem's responses (in sampling order); their
    verdicts are `correct` when given (e.g. from a reward worker pool), else `verdicts()`."""
    from megarl.rollout.reward import last_boxed

    if correct is None:
        correct = verdicts(responses, reference)
    answers = [last_boxed(r) for r in responses]
    clusters = _cluster(answers, correct)
    return [ScoredSample(answer=a, correct=bool(v), cluster=c)
            for a, v, c in zip(answers, correct, clusters)]


def _cluster(answers: Sequence[Optional[str]], correct: Sequence[bool]) -> list[Optional[int]]:
    """Cluster ids: 0 for every correct answer, then one id per group of equal wrong answers
    (numbered by first occurrence), None for responses without an answer."""
    labels: list[Optional[int]] = []
    by_key: dict[str, int] = {}
    readable: list[tuple[int, list[Any]]] = []  # (label, read answer) of each wrong group
    for answer, ok in zip(answers, correct):
        if ok or answer is None:
            labels.append(0 if ok else None)
            continue
        read = normal_form(answer)
        # An unreadable answer can only match the same text.
        key = str(read[0]) if read else "text:" + answer.strip()
        label = by_key.get(key)
        if label is None and read:
            # Different normal forms can still be equal (e.g. a set written two ways).
            label = next((lab for lab, rep in readable if equal(rep, read)), None)
        if label is None:
            label = len(set(by_key.values())) + 1
            if read:
                readable.append((label, read))
        by_key[key] = label
        labels.append(label)
    return labels
