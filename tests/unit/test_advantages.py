"""Advantage estimators against loops over the groups written from spec section 2."""

from __future__ import annotations

import math
import statistics

import pytest
import torch

from megarl.config import AlgorithmConfig
from megarl.trainer.advantages import advantages_from_config, compute_advantages

REWARDS = [1.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0, 1.0, 0.5, 0.3]
GROUPS = [7, 7, 7, 7, 3, 3, 3, 3, 9, 11]  # unsorted, non-contiguous ids; a group of one
EPS = 1e-6


def groups_of(i):
    return [REWARDS[j] for j in range(len(REWARDS)) if GROUPS[j] == GROUPS[i]]


def expected(estimator):
    out = []
    for i, r in enumerate(REWARDS):
        g = groups_of(i)
        mean = sum(g) / len(g)
        if estimator == "dr_grpo":
            out.append(r - mean)
        elif estimator == "grpo":
            std = statistics.stdev(g) if len(g) > 1 else 0.0
            out.append((r - mean) / (std + EPS))
        elif estimator == "rloo":  # baseline: the mean of the group without this response
            out.append(r - (sum(g) - r) / (len(g) - 1) if len(g) > 1 else 0.0)
        else:
            out.append((r - statistics.mean(REWARDS)) / (statistics.stdev(REWARDS) + EPS))
    return out


@pytest.mark.parametrize("estimator", ["grpo", "dr_grpo", "rloo", "reinforce_pp"])
def test_each_estimator(estimator):
    adv = compute_advantages(torch.tensor(REWARDS), torch.tensor(GROUPS), estimator, eps=EPS)
    assert adv.dtype == torch.float32
    assert adv.tolist() == pytest.approx(expected(estimator), rel=1e-6, abs=1e-6)


def test_groups_of_one_get_zero_and_uniform_groups_get_zero():
    adv = compute_advantages(torch.tensor([1.0, 1.0, 1.0, 0.2]), torch.tensor([0, 0, 0, 1]), "grpo")
    assert adv.tolist() == [0.0, 0.0, 0.0, 0.0]
    assert compute_advantages(torch.tensor([0.2]), torch.tensor([1]), "rloo").tolist() == [0.0]


def test_reinforce_pp_token_weighted_whitening():
    rewards, lengths = [1.0, 0.0, 0.0], [2, 1, 3]
    tokens = [r for r, n in zip(rewards, lengths) for _ in range(n)]
    mean, std = statistics.mean(tokens), statistics.stdev(tokens)
    adv = compute_advantages(torch.tensor(rewards), torch.tensor([0, 1, 2]), "reinforce_pp",
                             eps=EPS, response_lengths_N=torch.tensor(lengths))
    assert adv.tolist() == pytest.approx([(r - mean) / (std + EPS) for r in rewards], rel=1e-6)


def test_from_config_and_errors():
    cfg = AlgorithmConfig(advantage="dr_grpo")
    adv = advantages_from_config(torch.tensor([1.0, 0.0]), torch.tensor([0, 0]), cfg)
    assert adv.tolist() == [0.5, -0.5]
    with pytest.raises(ValueError, match="estimator"):
        compute_advantages(torch.tensor([1.0]), torch.tensor([0]), "ppo")
    with pytest.raises(ValueError, match="1-d"):
        compute_advantages(torch.tensor([1.0, 2.0]), torch.tensor([0]), "grpo")
    assert math.isfinite(compute_advantages(torch.tensor([2.0, 2.0]), torch.tensor([0, 1]),
                                            "reinforce_pp").sum())
