"""avg@n, pass@k and maj@k of one problem from its n verified samples (spec section 5).

All three are estimates over the n samples drawn for a problem; a benchmark's figure is their
mean over its problems.

- avg@n: the share of correct samples, c / n.
- pass@k: the probability that at least one of k samples drawn without replacement from the n
  is correct, 1 - C(n-c, k) / C(n, k) (the unbiased estimator of Chen et al., 2021), computed
  as a product of ratios so that it never forms the huge binomials.
- maj@k: the probability that the majority answer of k samples drawn without replacement from
  the n is correct, i.e. the mean over all C(n, k) subsets (each keeps the samples' order) of
  "the most frequent answer of the subset is correct". Answers are grouped into clusters of
  equal answers before voting (see `megarl.eval.answers`); a tie goes to the cluster whose
  first member in the subset comes first; samples without an answer do not vote, and a subset
  where nobody votes counts as wrong. maj@n is the single vote over all n samples. The subset
  mean is chosen over "the first k samples" because it uses every sample (lower variance) and
  matches how pass@k is estimated; it is computed exactly, without enumerating subsets.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence


def avg_at_n(num_samples: int, num_correct: int) -> float:
    """The share of correct samples."""
    _check_counts(num_samples, num_correct)
    return num_correct / num_samples


def pass_at_k(num_samples: int, num_correct: int, k: int) -> float:
    """Unbiased pass@k, 1 - C(n-c, k) / C(n, k), stable for any n."""
    _check_counts(num_samples, num_correct)
    _check_k(num_samples, k)
    n, c = num_samples, num_correct
    if n - c < k:
        return 1.0
    # C(n-c, k) / C(n, k) = prod_{i=n-c+1..n} (1 - k / i): each factor is in [0, 1), no overflow.
    miss = 1.0
    for i in range(n - c + 1, n + 1):
        miss *= 1.0 - k / i
    return 1.0 - miss


def maj_at_k(labels: Sequence[Optional[int]], correct_labels: set[int], k: int) -> float:
    """maj@k of one problem.

    `labels[i]` is the answer cluster of sample i (samples in the order they were drawn), None
    when sample i has no answer; `correct_labels` are the clusters whose answer is correct.
    """
    _check_k(len(labels), k)
    return sum(majority_win_probability(labels, label, k) for label in set(correct_labels)
               if label in labels)


def majority_win_probability(labels: Sequence[Optional[int]], winner: int, k: int) -> float:
    """The probability that cluster `winner` wins the vote of a uniform random k-subset.

    Counting argument: fix the first chosen member of `winner` (position p) and how many of its
    members are chosen (x). Every other cluster must then have fewer than x chosen members, or
    exactly x all after p (it loses the tie); samples without an answer are unconstrained. The
    number of ways is a product of one small polynomial per cluster, read at degree k - x.
    """
    _check_k(len(labels), k)
    n = len(labels)
    positions = [i for i, label in enumerate(labels) if label == winner]
    others = sorted({label for label in labels if label != winner}, key=_none_last)
    total_other = n - len(positions)
    counts = {label: labels.count(label) for label in others}
    ways = 0
    for t, p in enumerate(positions):
        later_own = len(positions) - t - 1
        after = {label: sum(1 for lab in labels[p + 1:] if lab == label) for label in others}
        for x in range(1, min(k, later_own + 1) + 1):
            own = math.comb(later_own, x - 1)
            rest = k - x
            if rest < x:
                # The others hold fewer than x votes between them: `winner` wins outright.
                ways += own * math.comb(total_other, rest)
                continue
            poly = [1] + [0] * rest
            for label in others:
                factor = _cluster_polynomial(counts[label], after[label], x, rest, label is None)
                poly = _multiply_truncated(poly, factor, rest)
            ways += own * poly[rest]
    return ways / math.comb(n, k)


def majority_label(labels: Sequence[Optional[int]]) -> Optional[int]:
    """The winning cluster of one vote: most members, ties to the earliest; None if no votes."""
    counts: dict[int, int] = {}
    for label in labels:
        if label is not None:
            counts[label] = counts.get(label, 0) + 1
    if not counts:
        return None
    best = max(counts.values())
    # dicts keep insertion order, i.e. order of first occurrence.
    return next(label for label, count in counts.items() if count == best)


def _cluster_polynomial(count: int, after: int, x: int, rest: int, abstains: bool) -> list[int]:
    """Ways of choosing y members of a losing cluster, as coefficients of z^y, y <= rest."""
    top = min(count, rest) if abstains else min(x - 1, count, rest)
    coeffs = [math.comb(count, y) for y in range(top + 1)]
    if not abstains and x <= rest:
        coeffs += [0] * (x - len(coeffs)) + [math.comb(after, x)]
    return coeffs


def _multiply_truncated(a: list[int], b: list[int], degree: int) -> list[int]:
    out = [0] * (degree + 1)
    for i, ai in enumerate(a):
        if ai:
            for j, bj in enumerate(b[: degree - i + 1]):
                out[i + j] += ai * bj
    return out


def _none_last(label: Optional[int]) -> tuple[bool, int]:
    return (label is None, label if label is not None else 0)


def _check_counts(num_samples: int, num_correct: int) -> None:
    if num_samples < 1 or not 0 <= num_correct <= num_samples:
        raise ValueError(f"need 0 <= num_correct <= num_samples and num_samples >= 1, got "
                         f"num_correct={num_correct}, num_samples={num_samples}")


def _check_k(num_samples: int, k: int) -> None:
    if not 1 <= k <= num_samples:
        raise ValueError(f"k={k} must be in [1, {num_samples}] (the samples of the problem)")
