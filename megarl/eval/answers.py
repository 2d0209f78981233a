"""Final answers of responses: extraction, verification against the reference, and grouping of
equal answers for majority voting, all with math-verify.

math-verify extracts the final answer of a response (a `\\boxed{...}` first, then other LaTeX or
plain expressions) and normalises it into a sympy object, so `\\dfrac12`, `0.5` and `1/2` are
the same answer. Grouping for the vote goes one step further than comparing normalised strings:
answers whose normal forms differ are still merged when math-verify judges them equal. All
correct answers of a problem form one group: each equals the reference, so they equal each other,
and grouping them by that fact keeps maj@k consistent with the per-sample verdicts where
math-verify's tolerant comparison is not transitive. Wrong answers are grouped among themselves.
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
    """The extracted final answer as written (None when the response has none)."""

    correct: bool
    """math-verify judged the answer equal to the reference."""

    cluster: Optional[int]
    """Group of equal answers this one belongs to for majority voting (None: no answer)."""


def _timeout() -> Optional[int]:
    # math-verify's time limit uses SIGALRM, which only the main thread may set.
    return _TIMEOUT_S if threading.current_thread() is threading.main_thread() else None


def parse_reference(reference: str) -> list[Any]:
    """The parsed reference answer. A bare reference like `\\frac{1}{2}` or `3, 5` is read as
    math (wrapped in `$...$`), because math-verify only finds unanchored LaTeX in a response."""
    from math_verify import parse

    text = str(reference).strip()
    if "$" not in text and "\\boxed" not in text:
        text = f"${text}$"
    return parse(text, parsing_timeout=_timeout())


def parse_response(response: str) -> list[Any]:
    """The parsed final answer of a response; an empty list when none was found."""
    from math_verify import parse

    return parse(response, parsing_timeout=_timeout())


def equal(gold: list[Any], target: list[Any]) -> bool:
    """math-verify's verdict; False for an empty side."""
    from math_verify import verify

    if not gold or not target:
        return False
    return bool(verify(gold, target, timeout_seconds=_timeout()))


def answer_text(parsed: list[Any]) -> Optional[str]:
    """The answer as extracted from the text (math-verify returns [normal form, source text])."""
    if not parsed:
        return None
    return str(parsed[-1])


def score_samples(responses: Sequence[str], reference: str) -> list[ScoredSample]:
    """Extract, verify and group the answers of one problem's responses (in sampling order)."""
    gold = parse_reference(reference)
    parsed = [parse_response(r) for r in responses]
    verdicts = [equal(gold, p) for p in parsed]
    clusters = _cluster(parsed, verdicts)
    return [ScoredSample(answer=answer_text(p), correct=v, cluster=c)
            for p, v, c in zip(parsed, verdicts, clusters)]


def _cluster(parsed: list[list[Any]], verdicts: list[bool]) -> list[Optional[int]]:
    """Cluster ids: 0 for every correct answer, then one id per group of equal wrong answers
    (numbered by first occurrence), None for responses without an answer."""
    labels: list[Optional[int]] = []
    by_normal_form: dict[str, int] = {}
    representatives: list[tuple[int, list[Any]]] = []  # (label, parsed answer) of wrong groups
    for answer, correct in zip(parsed, verdicts):
        if correct:
            labels.append(0)
            continue
        if not answer:
            labels.append(None)
            continue
        key = str(answer[0])
        label = by_normal_form.get(key)
        if label is None:
            # Different normal forms can still be equal (e.g. a set written two ways).
            label = next((lab for lab, rep in representatives if equal(rep, answer)), None)
        if label is None:
            label = len(representatives) + 1
            representatives.append((label, answer))
        by_normal_form[key] = label
        labels.append(label)
    return labels
