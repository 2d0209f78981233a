"""The clipped policy-gradient surrogate of spec section 2 (PPO, GRPO, DAPO clip-higher).

Legend: T = tokens of one micro-batch, flattened.

GRPO, Dr.GRPO, RLOO and REINFORCE++ differ only in their advantages and aggregation; they all
use this one surrogate. KL-Cov uses its unclipped form (`clip=False`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

# exp() of a log-ratio beyond this overflows float32 long before it means anything; the ratio
# is computed from the clamped value (its gradient is then 0, like a clipped token's).
MAX_LOG_RATIO = 20.0


@dataclass
class SurrogateOutput:
    """Per-token results [T]; every tensor is 0/False outside the mask."""

    token_loss: torch.Tensor
    """The surrogate loss of each token (differentiable)."""

    ratio: torch.Tensor
    """pi / pi_old (differentiable)."""

    clip_low: torch.Tensor
    """A < 0 and ratio < 1 - eps_low: the lower clip holds the loss (no gradient)."""

    clip_high: torch.Tensor
    """A > 0 and ratio > 1 + eps_high: the upper clip holds the loss (no gradient)."""

    dual_clip: torch.Tensor
    """A < 0 and ratio > c: the dual clip holds the loss at -A * c (no gradient)."""

    @property
    def clipped(self) -> torch.Tensor:
        """Tokens whose loss no longer depends on the ratio (any clip holds)."""
        return self.clip_low | self.clip_high | self.dual_clip


class ClippedSurrogate:
    """`l_t = max(-A r, -A clip(r, 1 - eps_low, 1 + eps_high))`, then for A < 0
    `l_t = min(l_t, -A c)` (dual clip, when c is set); with `clip=False`, `l_t = -A r`."""

    def __init__(self, *, eps_low: float, eps_high: float, dual_clip_c: Optional[float] = None,
                 clip: bool = True) -> None:
        if not 0 <= eps_low <= 1 or eps_high < 0:
            raise ValueError(f"need 0 <= eps_low <= 1 and eps_high >= 0, got {eps_low}, {eps_high}")
        if dual_clip_c is not None and dual_clip_c <= 1:
            raise ValueError(f"dual_clip_c must be > 1 (or None), got {dual_clip_c}")
        self.eps_low, self.eps_high = eps_low, eps_high
        self.dual_clip_c = dual_clip_c
        self.clip = clip

    @classmethod
    def from_config(cls, algorithm_cfg, *, clip: bool = True) -> "ClippedSurrogate":
        """The surrogate of an `AlgorithmConfig` (clip_eps_low/high, dual_clip_c)."""
        return cls(eps_low=algorithm_cfg.clip_eps_low, eps_high=algorithm_cfg.clip_eps_high,
                   dual_clip_c=algorithm_cfg.dual_clip_c, clip=clip)

    def __call__(self, log_probs_T: torch.Tensor, old_log_probs_T: torch.Tensor,
                 advantages_T: torch.Tensor, mask_T: torch.Tensor) -> SurrogateOutput:
        # Masked tokens get log-ratio 0 and advantage 0 through `where`, whose backward selects
        # rather than multiplies: garbage (even nan) in padding cannot reach the gradient.
        log_ratio = torch.where(mask_T, log_probs_T - old_log_probs_T, 0.0)
        ratio = torch.exp(log_ratio.clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO))
        adv = torch.where(mask_T, advantages_T, 0.0).to(ratio.dtype)
        loss = -adv * ratio
        none = torch.zeros_like(mask_T)
        if not self.clip:
            return SurrogateOutput(torch.where(mask_T, loss, 0.0), ratio, none, none, none)
        clipped_ratio = ratio.clamp(1.0 - self.eps_low, 1.0 + self.eps_high)
        loss = torch.maximum(loss, -adv * clipped_ratio)
        ratio_d = ratio.detach()
        clip_low = mask_T & (adv < 0) & (ratio_d < 1.0 - self.eps_low)
        clip_high = mask_T & (adv > 0) & (ratio_d > 1.0 + self.eps_high)
        dual = none
        if self.dual_clip_c is not None:
            loss = torch.where(adv < 0, torch.minimum(loss, -adv * self.dual_clip_c), loss)
            dual = mask_T & (adv < 0) & (ratio_d > self.dual_clip_c)
        return SurrogateOutput(torch.where(mask_T, loss, 0.0), ratio, clip_low, clip_high, dual)
