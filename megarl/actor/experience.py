"""The actor's input: one `Sample` per generated response.

The trainer fills prompt/response tokens, rewards, group ids and advantages from the rollout;
the actor's log-prob passes attach the behaviour and reference log-probs (on the last pipeline
stage, where the logits are). Samples are plain Python objects so that a rollout batch can be
broadcast to every trainer rank and recorded to disk for replay.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch


@dataclass(kw_only=True)
class Sample:
    prompt_ids: list[int]
    """Prompt tokens (after the chat template)."""

    response_ids: list[int]
    """Generated tokens, including a final end-of-sequence token when the model produced one."""

    group: int
    """Index of the prompt in the step's rollout batch (GRPO's group)."""

    reward: float
    """Scalar reward of the response."""

    advantage: float = 0.0
    """The response's advantage, broadcast to all its tokens."""

    rollout_log_probs: Optional[list[float]] = None
    """Per-token log-probs reported by the rollout server (one per response token)."""

    finish_reason: str = ""
    """stop, length or abort, as reported by the server."""

    counts_in_loss: bool = True
    """False drops every token of the response from the loss (e.g. over-long filtering)."""

    # Filled by the actor on the last pipeline stage (None elsewhere): one value per response
    # token, the log-prob of that token under the behaviour / reference policy.
    old_log_probs: Optional[torch.Tensor] = field(default=None, repr=False)
    ref_log_probs: Optional[torch.Tensor] = field(default=None, repr=False)
    old_entropy: Optional[torch.Tensor] = field(default=None, repr=False)
    old_nucleus_entropy: Optional[torch.Tensor] = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if not self.prompt_ids:
            raise ValueError("a sample needs at least one prompt token")
        if self.rollout_log_probs is not None and len(self.rollout_log_probs) != len(self.response_ids):
            raise ValueError(
                f"rollout_log_probs has {len(self.rollout_log_probs)} values for "
                f"{len(self.response_ids)} response tokens"
            )

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.response_ids)

    def trainable(self) -> bool:
        """Whether any token of this sample contributes to the loss."""
        return self.counts_in_loss and len(self.response_ids) > 0

    def for_transport(self) -> "Sample":
        """A copy without the actor's per-rank tensors (what is broadcast and recorded)."""
        return Sample(
            prompt_ids=self.prompt_ids, response_ids=self.response_ids, group=self.group,
            reward=self.reward, advantage=self.advantage,
            rollout_log_probs=self.rollout_log_probs, finish_reason=self.finish_reason,
            counts_in_loss=self.counts_in_loss,
        )
