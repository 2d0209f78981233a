"""pass@k and maj@k against brute-force enumeration of every k-subset of the samples."""

from __future__ import annotations

import itertools
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from megarl.eval.estimators import (
    avg_at_n, maj_at_k, majority_label, majority_win_probability, pass_at_k,
)


def brute_pass_at_k(correct: list[bool], k: int) -> float:
    subsets = list(itertools.combinations(range(len(correct)), k))
    return sum(any(correct[i] for i in s) for s in subsets) / len(subsets)


def brute_vote(labels: list, subset: tuple[int, ...]):
    """The subset's winner by the literal rule: most votes, ties to the first to appear."""
    chosen = [labels[i] for i in subset if labels[i] is not None]
    if not chosen:
        return None
    best = max(chosen.count(label) for label in chosen)
    return next(label for label in chosen if chosen.count(label) == best)


def brute_maj_at_k(labels: list, correct_labels: set, k: int) -> float:
    subsets = list(itertools.combinations(range(len(labels)), k))
    return sum(brute_vote(labels, s) in correct_labels for s in subsets) / len(subsets)


@given(st.lists(st.booleans(), min_size=1, max_size=10), st.data())
@settings(max_examples=150, deadline=None)
def test_pass_at_k_matches_enumeration(correct, data):
    k = data.draw(st.integers(1, len(correct)))
    expected = brute_pass_at_k(correct, k)
    assert pass_at_k(len(correct), sum(correct), k) == pytest.approx(expected, abs=1e-12)


def test_pass_at_k_edge_cases_and_large_n():
    assert pass_at_k(5, 0, 3) == 0.0
    assert pass_at_k(5, 3, 3) == 1.0  # only 2 wrong samples: any 3 contain a correct one
    assert pass_at_k(4, 1, 1) == pytest.approx(0.25)
    # Large n: the naive binomials overflow floats; the product form stays exact enough.
    n, c, k = 5000, 7, 64
    exact = 1 - math.comb(n - c, k) / math.comb(n, k)  # Python ints: exact ratio
    assert pass_at_k(n, c, k) == pytest.approx(exact, rel=1e-10)


labels_strategy = st.lists(st.one_of(st.none(), st.integers(0, 3)), min_size=1, max_size=9)


@given(labels_strategy, st.data())
@settings(max_examples=200, deadline=None)
def test_maj_at_k_matches_enumeration(labels, data):
    k = data.draw(st.integers(1, len(labels)))
    correct = data.draw(st.sets(st.integers(0, 3), max_size=2))
    expected = brute_maj_at_k(labels, correct, k)
    assert maj_at_k(labels, correct, k) == pytest.approx(expected, abs=1e-12)


@given(labels_strategy, st.data())
@settings(max_examples=100, deadline=None)
def test_win_probabilities_sum_to_share_of_subsets_with_a_vote(labels, data):
    k = data.draw(st.integers(1, len(labels)))
    clusters = {label for label in labels if label is not None}
    total = sum(majority_win_probability(labels, c, k) for c in clusters)
    subsets = list(itertools.combinations(range(len(labels)), k))
    voted = sum(brute_vote(labels, s) is not None for s in subsets) / len(subsets)
    assert total == pytest.approx(voted, abs=1e-12)


def test_maj_at_n_is_the_single_full_vote_and_ties_go_to_first():
    # Clusters 1 and 0 both have two votes; 1 appears first and wins.
    labels = [1, 0, None, 0, 1]
    assert majority_label(labels) == 1
    assert maj_at_k(labels, {1}, 5) == 1.0
    assert maj_at_k(labels, {0}, 5) == 0.0
    assert majority_label([None, None]) is None
    assert maj_at_k([None, None], {0}, 2) == 0.0


def test_maj_at_1_equals_share_of_correct_votes():
    labels = [0, 1, 1, None, 2, 1]
    assert maj_at_k(labels, {1}, 1) == pytest.approx(3 / 6)


def test_avg_and_argument_checks():
    assert avg_at_n(4, 1) == 0.25
    with pytest.raises(ValueError, match="k=5"):
        pass_at_k(4, 1, 5)
    with pytest.raises(ValueError, match="num_correct=5"):
        avg_at_n(4, 5)
    with pytest.raises(ValueError, match="k=0"):
        maj_at_k([0, 1], {0}, 0)


def test_maj_at_k_is_fast_for_32_samples():
    # A typical AIME setting: n = 32, a dozen distinct answers.
    labels = [i % 12 if i % 5 else None for i in range(32)]
    for k in (1, 4, 8, 16, 32):
        value = maj_at_k(labels, {3}, k)
        assert 0.0 <= value <= 1.0
