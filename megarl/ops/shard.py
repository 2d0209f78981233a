"""Where this rank's slice of the vocabulary sits, and the few collectives the ops need.

The output layer is column-parallel: tensor-parallel rank r holds the logits of global ids
[r * V_loc, (r + 1) * V_loc). Ids at or past the real (unpadded) vocab size carry no
probability, so each rank also knows how many of its columns are real. With `group=None`
one shard holds the whole vocab and every collective is the identity.

Shape legend: T tokens, V_loc columns of the local shard, R ranks of the group.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

# Global ids travel as float32 candidates (see nucleus.py), which hold integers exactly
# only below 2**24.
MAX_VOCAB = 1 << 24


@dataclass(frozen=True)
class VocabShard:
    """This rank's place in a vocab-parallel layout."""

    group: dist.ProcessGroup | None
    """The tensor-parallel group; None when one shard holds the whole vocab."""
    rank: int
    """This rank's index inside `group`."""
    size: int
    """Number of shards (the tensor-parallel size)."""
    vocab_local: int
    """Columns per shard (V_loc), padding included."""
    real_vocab: int
    """Global vocab size without padding; ids at or past it get no probability."""

    @classmethod
    def of(cls, vocab_local: int, group: dist.ProcessGroup | None,
           real_vocab_size: int | None) -> "VocabShard":
        """Describe the layout for `vocab_local` columns per rank of `group`."""
        if group is None:
            rank, size = 0, 1
        else:
            rank, size = dist.get_rank(group), dist.get_world_size(group)
        padded = vocab_local * size
        real = padded if real_vocab_size is None else int(real_vocab_size)
        if not 0 < real <= padded:
            raise ValueError(
                f"real_vocab_size={real_vocab_size} must be in [1, {padded}] "
                f"(the padded vocab: {vocab_local} columns x {size} ranks)"
            )
        if padded > MAX_VOCAB:
            raise ValueError(f"padded vocab {padded} exceeds the supported {MAX_VOCAB} ids")
        return cls(group, rank, size, vocab_local, real)

    @property
    def start(self) -> int:
        """Global id of this rank's first column."""
        return self.rank * self.vocab_local

    @property
    def real_local(self) -> int:
        """How many of this rank's columns are real ids (they lead the shard)."""
        return max(0, min(self.vocab_local, self.real_vocab - self.start))

    def all_reduce_max(self, t: torch.Tensor) -> torch.Tensor:
        """Elementwise max over the group, in place."""
        return self._all_reduce(t, dist.ReduceOp.MAX)

    def all_reduce_min(self, t: torch.Tensor) -> torch.Tensor:
        """Elementwise min over the group, in place."""
        return self._all_reduce(t, dist.ReduceOp.MIN)

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        """Elementwise sum over the group, in place."""
        return self._all_reduce(t, dist.ReduceOp.SUM)

    def _all_reduce(self, t: torch.Tensor, op) -> torch.Tensor:
        if self.size > 1:
            # collectives work on the storage: a strided view must travel as a copy
            work = t if t.is_contiguous() else t.contiguous()
            dist.all_reduce(work, op=op, group=self.group)
            if work is not t:
                t.copy_(work)
        return t

    def all_gather(self, t: torch.Tensor) -> torch.Tensor:
        """Stack every rank's `t` (same shape everywhere) along a new leading dim [R, ...]."""
        if self.size == 1:
            return t.unsqueeze(0)
        out = t.new_empty((self.size * t.shape[0], *t.shape[1:]))
        # torch 2.13 renamed all_gather_into_tensor; older releases only have the old name
        gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        gather(out, t.contiguous(), group=self.group)
        return out.view(self.size, *t.shape)
