"""AER, megarl's interpretation (Zhang et al. 2025; spec section 3.5).

No public code or full text exists; this is the reading the spec fixes, every choice a switch:
  `L = L_pg - alpha * agg(w_q(t) * H_t)`
* w_q per prompt from its group accuracy acc_q (share of its responses with reward > 0):
  `1 - acc_q` (`aer_weighting: difficulty`) or 1 (`uniform`), prompts whose rewards are all
  equal get 0 when `aer_skip_uniform_groups`, and the rest are scaled to mean 1 over the
  rollout batch's prompts. Computed in `begin_iteration` over the whole rollout batch and the
  data-parallel group (dense per-prompt sums, one all-reduce).
* `H_target = aer_target_ratio * H_0`, with H_0 the mean token entropy of the first optimizer
  step (the initial policy's, measured in that step's training forward) unless given.
* after each optimizer step `alpha <- clip(alpha + aer_lr * (H_target - H_step), 0,
  aer_alpha_max)`, H_step that step's mean token entropy over all micro-batches and DP ranks.
alpha and H_0 only ever change from all-reduced values, so they agree on every rank.

Legend: T = tokens of one micro-batch, flattened; S = its responses; G = prompts.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.distributed as dist

from ..batch import MicroBatch
from ..metrics import Metrics
from ..reduce import all_reduce, per_token
from .base import Intervention, LossInputs, StatsRequest, StepContext


def prompt_weights(micro_batches: Sequence[MicroBatch], *, difficulty: bool, skip_uniform: bool,
                   dp_group: Optional[dist.ProcessGroup]) -> torch.Tensor:
    """Per-prompt weights w_q [G] (float64), mean 1 over the prompts that are not skipped."""
    for mb in micro_batches:
        if mb.seq_group_ids is None or mb.seq_rewards is None:
            raise ValueError("entropy.intervention=aer needs MicroBatch.seq_group_ids and "
                             "seq_rewards (or aer_weighting=uniform with "
                             "aer_skip_uniform_groups=false)")
    device = micro_batches[0].mask.device if micro_batches else torch.device("cpu")
    ids = [mb.seq_group_ids.to(device) for mb in micro_batches]
    rewards = [mb.seq_rewards.to(device, torch.float64) for mb in micro_batches]
    size = torch.tensor([max((int(i.max()) + 1 for i in ids if i.numel()), default=0)],
                        device=device)
    num_groups = int(all_reduce(size, dp_group, dist.ReduceOp.MAX))
    ids_S = torch.cat(ids) if ids else torch.zeros(0, dtype=torch.long, device=device)
    rewards_S = torch.cat(rewards) if rewards else torch.zeros(0, dtype=torch.float64, device=device)
    sums = torch.zeros(2, num_groups, dtype=torch.float64, device=device)
    sums[0].index_add_(0, ids_S, torch.ones_like(rewards_S))
    sums[1].index_add_(0, ids_S, (rewards_S > 0).double())
    # max and -min in one MAX reduction: a group is uniform when they coincide.
    extremes = torch.full((2, num_groups), float("-inf"), dtype=torch.float64, device=device)
    extremes[0].scatter_reduce_(0, ids_S, rewards_S, reduce="amax")
    extremes[1].scatter_reduce_(0, ids_S, -rewards_S, reduce="amax")
    all_reduce(sums, dp_group)
    all_reduce(extremes, dp_group, dist.ReduceOp.MAX)
    present = sums[0] > 0
    accuracy = sums[1] / sums[0].clamp(min=1.0)
    weights = 1.0 - accuracy if difficulty else torch.ones_like(accuracy)
    keep = present
    if skip_uniform:
        keep = keep & (extremes[0] != -extremes[1])
    weights = torch.where(keep, weights, 0.0)
    mean = weights.sum() / keep.sum().clamp(min=1)
    return torch.where(mean > 0, weights / mean.clamp(min=1e-30), 0.0)


class Aer(Intervention):
    """Adaptive entropy regularisation (interpretation); see the module docstring."""

    name = "aer"

    def __init__(self, config, *, seed: int = 0) -> None:
        super().__init__(config, seed=seed)
        self.alpha: float = config.aer_alpha_init
        self.initial_entropy: Optional[float] = config.aer_initial_entropy
        self._weights_G: Optional[torch.Tensor] = None

    def state_dict(self) -> dict:
        return {"alpha": self.alpha, "initial_entropy": self.initial_entropy}

    def stats_request(self) -> StatsRequest:
        return StatsRequest(entropy=True)

    @property
    def _uses_groups(self) -> bool:
        return self.config.aer_weighting == "difficulty" or self.config.aer_skip_uniform_groups

    def begin_iteration(self, micro_batches: Sequence[MicroBatch], dp_group) -> None:
        if self._uses_groups:
            self._weights_G = prompt_weights(
                micro_batches, difficulty=self.config.aer_weighting == "difficulty",
                skip_uniform=self.config.aer_skip_uniform_groups, dp_group=dp_group)

    def token_weights(self, batch: MicroBatch) -> torch.Tensor:
        """w_q(t) [T] for the flattened micro-batch (0 outside the mask)."""
        if not self._uses_groups:
            return batch.mask.float()
        if self._weights_G is None:
            raise RuntimeError("AER: begin_iteration must run before the loss")
        weights_S = self._weights_G.to(batch.mask.device)[batch.seq_group_ids]
        return per_token(weights_S, batch.mask, batch.seq_ids).float()

    def loss(self, inputs: LossInputs) -> tuple[torch.Tensor, Metrics]:
        weights = self.token_weights(inputs.batch)
        metrics = Metrics()
        metrics.add("aer/alpha", self.alpha)
        metrics.add_mean("aer/weight_mean", weights, inputs.mask)
        if self.initial_entropy is not None:
            metrics.add("aer/target", self.config.aer_target_ratio * self.initial_entropy)
        return -self.alpha * inputs.agg(weights * inputs.entropy), metrics

    def end_step(self, step: StepContext) -> None:
        if step.entropy_mean is None:
            raise RuntimeError("AER: the step's mean entropy was not measured")
        if self.initial_entropy is None:
            self.initial_entropy = step.entropy_mean
        target = self.config.aer_target_ratio * self.initial_entropy
        alpha = self.alpha + self.config.aer_lr * (target - step.entropy_mean)
        self.alpha = min(max(alpha, 0.0), self.config.aer_alpha_max)
