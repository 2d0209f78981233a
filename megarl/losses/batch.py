"""The per-token tensors of one micro-batch, as the losses see them.

Legend: [...] = the micro-batch's token layout (e.g. [B, S] padded rows or [T] packed); every
per-token tensor of a micro-batch and the op outputs (`TokenStats`) share it. [S] = responses.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Optional

import torch

_PER_TOKEN = ("advantages", "old_log_probs", "ref_log_probs", "old_entropy",
              "old_nucleus_entropy")


@dataclass(kw_only=True)
class MicroBatch:
    """One micro-batch's inputs to the policy objective (everything but the logits).

    Responses may be packed several per row: per-response reductions use `seq_ids`, never
    the row. A response must lie entirely in one micro-batch.
    """

    mask: torch.Tensor
    """[...] bool: generated tokens that count in the loss (padding, prompts: False)."""

    seq_ids: torch.Tensor
    """[...] int64: the response each token belongs to, in [0, num_seqs) on valid tokens; any
    value (e.g. -1) elsewhere."""

    num_seqs: int
    """Responses in this micro-batch (each counts once in the sequence normalisers)."""

    advantages: torch.Tensor
    """[...] per-token advantages (the response's advantage broadcast to its tokens)."""

    old_log_probs: torch.Tensor
    """[...] behaviour-policy log-probs of the sampled tokens (old-log-prob pass or rollout)."""

    ref_log_probs: Optional[torch.Tensor] = None
    """[...] reference-policy log-probs; needed when algorithm.kl_coef > 0."""

    old_entropy: Optional[torch.Tensor] = None
    """[...] full entropy from the old-log-prob pass (`TokenStats.entropy`), when recorded."""

    old_nucleus_entropy: Optional[torch.Tensor] = None
    """[...] nucleus entropy from the old-log-prob pass (`TokenStats.nucleus_entropy`); SIREN
    needs it (it measures its anchor and its step coefficient from it)."""

    seq_group_ids: Optional[torch.Tensor] = None
    """[S] int64: the prompt of each response, as an index in [0, prompts in the rollout
    batch); AER's difficulty weights need it."""

    seq_rewards: Optional[torch.Tensor] = None
    """[S] float: each response's reward (> 0 counts as correct for AER's group accuracy)."""

    def __post_init__(self) -> None:
        self.mask = self.mask.bool()
        shape = self.mask.shape
        if self.seq_ids.shape != shape:
            raise ValueError(f"seq_ids has shape {tuple(self.seq_ids.shape)}, mask {tuple(shape)}")
        for name in _PER_TOKEN:
            value = getattr(self, name)
            if value is not None and value.shape != shape:
                raise ValueError(f"{name} has shape {tuple(value.shape)}, mask {tuple(shape)}")
        for name in ("seq_group_ids", "seq_rewards"):
            value = getattr(self, name)
            if value is not None and value.shape != (self.num_seqs,):
                raise ValueError(f"{name} has shape {tuple(value.shape)}, expected "
                                 f"({self.num_seqs},) (one per response)")
        if self.num_seqs < 0:
            raise ValueError(f"num_seqs must be >= 0, got {self.num_seqs}")

    def flat(self) -> "MicroBatch":
        """The same micro-batch with every per-token tensor flattened to [T]."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        for name in ("mask", "seq_ids", *_PER_TOKEN):
            if values[name] is not None:
                values[name] = values[name].reshape(-1)
        return MicroBatch(**values)


def rows_to_seq_ids(mask_BS: torch.Tensor) -> torch.Tensor:
    """Sequence ids [B, S] for the padded layout with one response per row."""
    rows_B1 = torch.arange(mask_BS.shape[0], device=mask_BS.device).unsqueeze(1)
    return rows_B1.expand_as(mask_BS).contiguous()
