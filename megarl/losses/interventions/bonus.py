"""No intervention, and the plain entropy bonus (spec section 3.1)."""

from __future__ import annotations

import torch

from ..metrics import Metrics
from .base import Intervention, LossInputs, StatsRequest, zero_loss


class NoIntervention(Intervention):
    """The policy loss alone (GRPO, Dr.GRPO, ... as configured in `algorithm`)."""

    name = "none"

    def loss(self, inputs: LossInputs) -> tuple[torch.Tensor, Metrics]:
        return zero_loss(inputs), Metrics()


class EntropyBonus(Intervention):
    """`L = L_pg - beta * agg(H)` with beta = `entropy.entropy_coef` (0 switches it off)."""

    name = "entropy_bonus"

    def stats_request(self) -> StatsRequest:
        return StatsRequest(entropy=True)

    def loss(self, inputs: LossInputs) -> tuple[torch.Tensor, Metrics]:
        beta = self.config.entropy_coef
        metrics = Metrics()
        metrics.add("entropy_bonus/coef", beta)
        if beta == 0:
            return zero_loss(inputs), metrics
        return -beta * inputs.agg(inputs.entropy), metrics
