"""Clip-Cov and KL-Cov (Cui et al. 2025; spec sections 3.2 and 3.3).

Both rank tokens by the covariance of their log-prob and advantage,
`cov_t = (lp_t - mean(lp)) * (A_t - mean(A))` (lp detached), the tokens whose updates drive
entropy down. The means are over this rank's micro-batch (`cov_scope: local`, the papers'
reference) or over the current micro-batch of every data-parallel rank (`cov_scope: global`,
one all-reduce of three numbers per micro-batch). The number of tokens acted on is always
taken from this rank's micro-batch: `max(1, floor(ratio * N_valid))`.

Every tensor-parallel rank holds the same per-token tensors (the vocab-parallel ops reduce
over TP), so selections agree across TP ranks; Clip-Cov's random draw uses a generator seeded
from (seed, draw counter), and the counter advances once per micro-batch on every rank.

Legend: T = tokens of one micro-batch, flattened.
"""

from __future__ import annotations

import math

import torch

from ..metrics import Metrics
from ..reduce import all_reduce, segment_quantile
from .base import Intervention, LossInputs

COV_QUANTILES = (0.5, 0.9, 0.99)


def token_covariance(inputs: LossInputs, scope: str) -> torch.Tensor:
    """cov_t [T] (float64, 0 outside the mask) with means of the given scope."""
    mask = inputs.mask
    lp = inputs.log_probs.detach().double()
    adv = inputs.batch.advantages.double()
    sums = torch.stack([torch.where(mask, lp, 0).sum(), torch.where(mask, adv, 0).sum(),
                        mask.sum().double()])
    if scope == "global":
        all_reduce(sums, inputs.step.dp_group)
    count = sums[2].clamp(min=1.0)
    cov = (lp - sums[0] / count) * (adv - sums[1] / count)
    return torch.where(mask, cov, 0.0)


def covariance_metrics(cov_T: torch.Tensor, mask_T: torch.Tensor, metrics: Metrics) -> None:
    """`cov/mean` (token mean) and `cov/p50|p90|p99` (this micro-batch's quantiles)."""
    metrics.add("cov/mean", cov_T.sum(), mask_T.sum())
    has_tokens = bool(mask_T.any())
    zeros = torch.zeros_like(mask_T, dtype=torch.long)
    for q in COV_QUANTILES:
        value = segment_quantile(cov_T, mask_T, zeros, 1, q)[0] if has_tokens else 0.0
        metrics.add(f"cov/p{round(q * 100)}", value, 1.0 if has_tokens else 0.0)


def num_selected(ratio: float, num_valid: int) -> int:
    """`max(1, floor(ratio * N_valid))`, 0 for a micro-batch without valid tokens."""
    return max(1, math.floor(ratio * num_valid)) if num_valid > 0 else 0


class ClipCov(Intervention):
    """Clip-Cov: the loss of `n = max(1, floor(clip_cov_ratio * N_valid))` tokens, drawn
    uniformly among the candidates (valid, not clipped by PPO or the dual clip,
    `cov_lb < cov_t < cov_ub`), is zeroed: their gradient stops, they still count in the
    aggregation's denominators. Returned as the term `-agg(l_t * selected_t)`, exact because
    `agg` is a weighted sum."""

    name = "clip_cov"

    def __init__(self, config, *, seed: int = 0) -> None:
        super().__init__(config, seed=seed)
        self.draws = 0

    def state_dict(self) -> dict:
        return {"draws": self.draws}

    def _generator(self) -> torch.Generator:
        generator = torch.Generator(device="cpu")
        generator.manual_seed((self.seed * 1_000_003 + self.draws) % (2**63))
        self.draws += 1
        return generator

    def select(self, inputs: LossInputs, cov_T: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The tokens [T] (bool) whose loss is zeroed in this micro-batch, and the candidates."""
        cfg = self.config
        candidates = (inputs.mask & ~inputs.surrogate.clipped
                      & (cov_T > cfg.cov_lb) & (cov_T < cfg.cov_ub))
        n = num_selected(cfg.clip_cov_ratio, int(inputs.mask.sum()))
        generator = self._generator()  # drawn on every call, so all ranks stay in step
        index = torch.nonzero(candidates).squeeze(1)
        pick = torch.randperm(index.numel(), generator=generator)[:n].to(index.device)
        selected = torch.zeros_like(candidates)
        selected[index[pick]] = True
        return selected, candidates

    def loss(self, inputs: LossInputs) -> tuple[torch.Tensor, Metrics]:
        cov = token_covariance(inputs, self.config.cov_scope)
        selected, candidates = self.select(inputs, cov)
        term = -inputs.agg(torch.where(selected, inputs.surrogate.token_loss, 0.0))
        metrics = Metrics()
        covariance_metrics(cov, inputs.mask, metrics)
        metrics.add("clip_cov/frac_clipped", selected.sum(), inputs.mask.sum())
        metrics.add("clip_cov/frac_candidates", candidates.sum(), inputs.mask.sum())
        return term, metrics


class KLCov(Intervention):
    """KL-Cov: unclipped surrogate `-A r`; the top-k tokens by cov_t,
    `k = max(1, floor(kl_cov_ratio * N_valid))`, get `kl_cov_coef * |lp_t - lp_old_t|`."""

    name = "kl_cov"
    clip_surrogate = False

    def select(self, inputs: LossInputs, cov_T: torch.Tensor) -> torch.Tensor:
        """The tokens [T] (bool) that get the penalty in this micro-batch."""
        k = num_selected(self.config.kl_cov_ratio, int(inputs.mask.sum()))
        ranked = torch.where(inputs.mask, cov_T, float("-inf"))
        selected = torch.zeros_like(inputs.mask)
        selected[torch.topk(ranked, k).indices] = True
        return selected

    def loss(self, inputs: LossInputs) -> tuple[torch.Tensor, Metrics]:
        cov = token_covariance(inputs, self.config.cov_scope)
        selected = self.select(inputs, cov)
        old = torch.where(inputs.mask, inputs.batch.old_log_probs, inputs.log_probs.detach())
        gap = (inputs.log_probs - old).abs()
        term = self.config.kl_cov_coef * inputs.agg(torch.where(selected, gap, 0.0))
        metrics = Metrics()
        covariance_metrics(cov, inputs.mask, metrics)
        metrics.add("kl_cov/frac_penalised", selected.sum(), inputs.mask.sum())
        metrics.add("kl_cov/abs_log_ratio", torch.where(selected, gap.detach(), 0).sum(),
                    selected.sum())
        return term, metrics
