"""Advantage estimators (spec section 2): rewards grouped by prompt -> per-response advantages.

Legend: N = responses of the rollout batch. The caller broadcasts each response's advantage to
its tokens. All estimators work on the whole rollout batch (every response's reward is known
before the batch is split over data-parallel ranks), in float64, and return float32.

  grpo          (r - mean_g) / (std_g + eps), std with Bessel's correction (n - 1)
  dr_grpo       r - mean_g                                           (Dr.GRPO: no std)
  rloo          r - mean of the other responses of the group = n / (n - 1) * (r - mean_g)
  reinforce_pp  (r - mean_B) / (std_B + eps) over the whole batch (REINFORCE++), optionally
                token-weighted by response length (each token of a response is one return)
A group of one response has no baseline to compare with: its advantage is 0 in grpo, dr_grpo
and rloo.
"""

from __future__ import annotations

from typing import Optional

import torch

ESTIMATORS = ("grpo", "dr_grpo", "rloo", "reinforce_pp")


def compute_advantages(rewards_N: torch.Tensor, group_ids_N: torch.Tensor, estimator: str, *,
                       eps: float = 1e-6,
                       response_lengths_N: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Per-response advantages [N] (float32).

    `group_ids_N`: any integer id per response, equal for responses to the same prompt.
    `response_lengths_N`: only for reinforce_pp, to whiten over tokens instead of responses.
    """
    if estimator not in ESTIMATORS:
        raise ValueError(f"advantage estimator {estimator!r} is not one of {ESTIMATORS}")
    if rewards_N.shape != group_ids_N.shape or rewards_N.dim() != 1:
        raise ValueError(f"rewards {tuple(rewards_N.shape)} and group ids "
                         f"{tuple(group_ids_N.shape)} must be the same 1-d shape")
    rewards = rewards_N.double()
    if estimator == "reinforce_pp":
        weights = torch.ones_like(rewards) if response_lengths_N is None else response_lengths_N.double()
        return _whiten(rewards, weights, eps).float()
    _, group_N = torch.unique(group_ids_N, return_inverse=True)
    num_groups = int(group_N.max()) + 1 if group_N.numel() else 0
    count_G = torch.zeros(num_groups, dtype=torch.float64).index_add_(0, group_N, torch.ones_like(rewards))
    mean_G = torch.zeros(num_groups, dtype=torch.float64).index_add_(0, group_N, rewards) / count_G
    centred = rewards - mean_G[group_N]
    count = count_G[group_N]
    if estimator == "dr_grpo":
        return centred.float()
    if estimator == "rloo":
        return torch.where(count > 1, centred * count / (count - 1).clamp(min=1), 0.0).float()
    sq_G = torch.zeros(num_groups, dtype=torch.float64).index_add_(0, group_N, centred.square())
    std = (sq_G / (count_G - 1).clamp(min=1)).sqrt()[group_N]
    return (centred / (std + eps)).float()


def _whiten(values: torch.Tensor, weights: torch.Tensor, eps: float) -> torch.Tensor:
    """(v - weighted mean) / (weighted std + eps), std with Bessel's correction on the total
    weight (for unit weights: the sample std)."""
    total = weights.sum()
    mean = (weights * values).sum() / total.clamp(min=1e-30)
    var = (weights * (values - mean).square()).sum() / (total - 1).clamp(min=1e-30)
    return (values - mean) / (var.sqrt() + eps)


def advantages_from_config(rewards_N: torch.Tensor, group_ids_N: torch.Tensor, algorithm_cfg,
                           response_lengths_N: Optional[torch.Tensor] = None) -> torch.Tensor:
    """`compute_advantages` with `algorithm.advantage` and `algorithm.advantage_eps`."""
    return compute_advantages(rewards_N, group_ids_N, algorithm_cfg.advantage,
                              eps=algorithm_cfg.advantage_eps, response_lengths_N=response_lengths_N)
