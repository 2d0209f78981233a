"""`algorithm`: advantages, the clipped policy-gradient surrogate, its aggregation, the KL term,
batch sizes of the update, and DAPO-style sampling filters."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from .errors import check_choice, check_non_negative, check_positive, check_range

ADVANTAGES = ("grpo", "dr_grpo", "rloo", "reinforce_pp")
AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")
KL_ESTIMATORS = ("k1", "k2", "k3")


@dataclass(kw_only=True)
class AlgorithmConfig:
    advantage: str = "grpo"
    """Advantage estimator: grpo ((r - group mean) / (group std + eps)), dr_grpo (r - group
    mean), rloo (leave-one-out baseline) or reinforce_pp (batch-whitened rewards)."""

    advantage_eps: float = 1e-6
    """The eps in the GRPO and REINFORCE++ denominators."""

    clip_eps_low: float = 0.2
    """PPO lower clip: the ratio is clipped below at 1 - clip_eps_low."""

    clip_eps_high: float = 0.2
    """PPO upper clip: the ratio is clipped above at 1 + clip_eps_high (0.28 is DAPO's
    clip-higher)."""

    dual_clip_c: Optional[float] = 3.0
    """Dual clip for negative advantages: the loss is at most -A * c; null switches it off."""

    loss_agg_mode: str = "token-mean"
    """token-mean, seq-mean-token-mean or seq-mean-token-sum-norm (Dr.GRPO); normalised over
    the whole optimizer step on every data-parallel rank."""

    kl_coef: float = 0.0
    """Weight of the KL penalty to the reference (initial) policy; 0 means no reference model."""

    kl_estimator: str = "k3"
    """KL estimator: k1 (lp - lp_ref), k2 (squared / 2) or k3 (low-variance)."""

    prompts_per_mini_batch: Optional[int] = None
    """Prompts per optimizer step; null makes the whole rollout batch one optimizer step."""

    ppo_epochs: int = 1
    """Passes over each rollout batch."""

    micro_batch_tokens: int = 16384
    """Token budget of one packed micro-batch (per data-parallel rank)."""

    logits_chunk_tokens: int = 4096
    """Tokens per chunk in the vocab-parallel log-prob and entropy ops: bounds their extra
    memory to chunk x local vocab floats."""

    use_rollout_logprobs: bool = False
    """Use the servers' log-probs as the behaviour policy instead of recomputing them on the
    actor (faster; slightly off-policy because of kernel differences)."""

    dynamic_sampling: bool = False
    """DAPO dynamic sampling: drop prompt groups whose rewards are all equal and draw more
    prompts until the batch is full."""

    max_sampling_rounds: int = 3
    """Extra generation rounds dynamic sampling may run for one step."""

    overlong: str = "none"
    """Responses cut at max_new_tokens: none (keep), filter (mask out of the loss) or penalty
    (DAPO's soft length penalty over the last `overlong_buffer_tokens`)."""

    overlong_buffer_tokens: int = 512
    """Length of the soft penalty zone before max_new_tokens."""

    overlong_penalty: float = 1.0
    """Largest soft length penalty, reached at max_new_tokens."""

    def validate(self) -> None:
        check_choice("algorithm", "advantage", self.advantage, ADVANTAGES)
        check_positive("algorithm", "advantage_eps", self.advantage_eps)
        check_non_negative("algorithm", "clip_eps_low", self.clip_eps_low)
        check_range("algorithm", "clip_eps_low", self.clip_eps_low, high=1)
        check_non_negative("algorithm", "clip_eps_high", self.clip_eps_high)
        check_range("algorithm", "dual_clip_c", self.dual_clip_c, low=1, low_open=True)
        check_choice("algorithm", "loss_agg_mode", self.loss_agg_mode, AGGREGATIONS)
        check_non_negative("algorithm", "kl_coef", self.kl_coef)
        check_choice("algorithm", "kl_estimator", self.kl_estimator, KL_ESTIMATORS)
        check_positive("algorithm", "prompts_per_mini_batch", self.prompts_per_mini_batch)
        check_positive("algorithm", "ppo_epochs", self.ppo_epochs)
        check_positive("algorithm", "micro_batch_tokens", self.micro_batch_tokens)
        check_positive("algorithm", "logits_chunk_tokens", self.logits_chunk_tokens)
        check_non_negative("algorithm", "max_sampling_rounds", self.max_sampling_rounds)
        check_choice("algorithm", "overlong", self.overlong, ("none", "filter", "penalty"))
        check_non_negative("algorithm", "overlong_buffer_tokens", self.overlong_buffer_tokens)
        check_non_negative("algorithm", "overlong_penalty", self.overlong_penalty)
