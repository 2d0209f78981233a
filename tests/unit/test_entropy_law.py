"""The entropy-performance law fit recovers known a and b, online and in one go."""

from __future__ import annotations

import math
import random

import pytest

from megarl.metrics.entropy_law import EntropyLawFitter, fit_entropy_law


def synthetic(a: float, b: float, num: int, noise: float, seed: int = 0):
    rng = random.Random(seed)
    # Entropy falling over training, as it does without an intervention.
    entropies = [1.2 * math.exp(-i / (num / 3)) + 0.05 * rng.random() for i in range(num)]
    rewards = [-a * math.exp(h) + b + rng.gauss(0.0, noise) for h in entropies]
    return entropies, rewards


@pytest.mark.parametrize("a,b", [(0.3, 0.9), (0.05, 0.45), (1.5, 4.0)])
def test_exact_points_give_exact_a_b(a, b):
    entropies, rewards = synthetic(a, b, 40, noise=0.0)
    fit = fit_entropy_law(entropies, rewards)
    assert fit.a == pytest.approx(a, rel=1e-9)
    assert fit.b == pytest.approx(b, rel=1e-9)
    assert fit.ceiling == pytest.approx(b - a, rel=1e-9)
    assert fit.r2 == pytest.approx(1.0)
    assert fit.predict(0.0) == pytest.approx(b - a)


def test_noisy_points_recover_a_b_and_predict_the_rest():
    a, b = 0.3, 0.9
    entropies, rewards = synthetic(a, b, 400, noise=0.01, seed=1)
    fit = fit_entropy_law(entropies, rewards)
    assert fit.a == pytest.approx(a, abs=0.01)
    assert fit.b == pytest.approx(b, abs=0.015)
    assert 0.9 < fit.r2 < 1.0
    # Cui et al.'s use: fit on the early steps, predict the later rewards.
    early = fit_entropy_law(entropies[:100], rewards[:100])
    late = [early.predict(h) - (-a * math.exp(h) + b) for h in entropies[300:]]
    assert max(abs(e) for e in late) < 0.03


def test_online_fitter_matches_batch_fit_and_waits_for_min_points():
    entropies, rewards = synthetic(0.3, 0.9, 30, noise=0.02, seed=2)
    fitter = EntropyLawFitter(min_points=5)
    for i, (h, r) in enumerate(zip(entropies, rewards)):
        metrics = fitter.update(h, r)
        if i < 4:
            assert metrics == {}
        else:
            assert set(metrics) == {"entropy_law/a", "entropy_law/b", "entropy_law/ceiling",
                                    "entropy_law/r2"}
            batch = fit_entropy_law(entropies[:i + 1], rewards[:i + 1])
            assert metrics["entropy_law/a"] == pytest.approx(batch.a, rel=1e-9)
            assert metrics["entropy_law/ceiling"] == pytest.approx(batch.b - batch.a, rel=1e-9)
    # Resume: the state survives a round trip and goes on identically.
    restored = EntropyLawFitter(min_points=5)
    restored.load_state_dict(fitter.state_dict())
    assert restored.update(0.1, 0.55) == fitter.update(0.1, 0.55)


def test_stable_with_large_offsets():
    # exp(H) near a large value with a tiny spread: the naive sum-of-squares formula loses its
    a, b = 2.0, 1000.0
    # digits here (a = 2.0156 instead of 2); the co-moment update keeps them.
    entropies = [10.0 + 1e-8 * i for i in range(50)]
    rewards = [-a * math.exp(h) + b for h in entropies]
    fit = fit_entropy_law(entropies, rewards)
    assert fit.a == pytest.approx(a, rel=1e-6)
    assert fit.b == pytest.approx(b, rel=1e-6)


def test_degenerate_input():
    assert fit_entropy_law([0.5] * 10, [0.1 * i for i in range(10)]) is None  # no spread
    assert fit_entropy_law([0.5], [0.2]) is None
    fitter = EntropyLawFitter(min_points=2)
    assert fitter.update(float("nan"), 1.0) == {} and fitter.update(0.1, float("inf")) == {}
    with pytest.raises(ValueError, match="min_points=1"):
        EntropyLawFitter(min_points=1)
