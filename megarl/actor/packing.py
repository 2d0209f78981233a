"""Micro-batches by token budget, balanced over data-parallel ranks, as model inputs.

Two layouts:
- padded (any attention backend, the CPU path): one sample per row, right padding, [B, S];
  causal attention makes padding invisible to real tokens;
- packed THD (transformer-engine attention): samples concatenated into one row [1, T] with
  `PackedSeqParams` cumulative lengths, so no compute is spent on padding.

Position t of the logits predicts token t + 1, so every per-token tensor here is aligned with
the logits: `targets[t] = tokens[t + 1]` and `loss_mask[t]` marks positions whose target is a
response token that counts. Legend: B rows, S padded length, T packed tokens.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from megarl.actor.experience import Sample


def balance_over_ranks(samples: Sequence[Sample], num_ranks: int) -> list[list[int]]:
    """Indices of `samples` per data-parallel rank, with near-equal token totals.

    Longest first onto the least-loaded rank (LPT); within a rank the original order is kept so
    that results are deterministic and every rank of a model replica plans the same way.
    """
    loads = [(0, r) for r in range(num_ranks)]
    heapq.heapify(loads)
    owner: dict[int, int] = {}
    order = sorted(range(len(samples)), key=lambda i: (-samples[i].num_tokens, i))
    for i in order:
        load, rank = heapq.heappop(loads)
        owner[i] = rank
        heapq.heappush(loads, (load + samples[i].num_tokens, rank))
    return [[i for i in range(len(samples)) if owner[i] == r] for r in range(num_ranks)]


def plan_micro_batches(lengths: Sequence[int], token_budget: int, *, padded: bool,
                       multiple_of: int = 1) -> list[list[int]]:
    """Group sample indices into micro-batches of at most `token_budget` tokens (counted as
    rows x longest row when padded, as the sum when packed), keeping the input order.

    A sample longer than the budget gets a micro-batch of its own rather than an error: the
    budget bounds memory for the common case, not correctness. With `multiple_of` > 1 (the
    interleaved pipeline schedule needs a multiple of the pipeline size) the samples are
    split into the next multiple of micro-batches instead (the previous one when there are
    too few samples), with near-equal token counts.
    """
    plans = _by_budget(lengths, token_budget, padded)
    if len(plans) % multiple_of == 0:
        return plans
    parts = -(-len(plans) // multiple_of) * multiple_of
    if parts > len(lengths):   # not enough samples: fewer, larger micro-batches
        parts = len(lengths) // multiple_of * multiple_of
    if parts == 0:
        raise ValueError(f"{len(lengths)} samples cannot fill {multiple_of} micro-batches (the "
                         "pipeline size, which the interleaved schedule needs at least)")
    return _even_split(lengths, parts)


def _even_split(lengths: Sequence[int], parts: int) -> list[list[int]]:
    """`parts` contiguous non-empty groups whose token totals are as equal as order allows."""
    total, done, groups, start = sum(lengths), 0, [], 0
    for part in range(1, parts):
        end = start + 1           # every group takes at least one sample ...
        done += lengths[start]
        # ... then samples while the running total stays below this group's share, leaving
        # one sample for each group still to come.
        while end < len(lengths) - (parts - part) and done + lengths[end] <= total * part / parts:
            done += lengths[end]
            end += 1
        groups.append(list(range(start, end)))
        start = end
    groups.append(list(range(start, len(lengths))))
    return groups


def _by_budget(lengths: Sequence[int], token_budget: int, padded: bool) -> list[list[int]]:
    plans: list[list[int]] = []
    current: list[int] = []
    longest = total = 0
    for i, n in enumerate(lengths):
        new_longest = max(longest, n)
        cost = new_longest * (len(current) + 1) if padded else total + n
        if current and cost > token_budget:
            plans.append(current)
            current, longest, total = [], 0, 0
            new_longest = n
        current.append(i)
        longest, total = new_longest, total + n
    if current:
        plans.append(current)
    return plans


@dataclass
class ModelInputs:
    """Tensors of one micro-batch, in the layout of the logits."""

    tokens: torch.Tensor          # [B, S] or [1, T] int64
    position_ids: torch.Tensor    # same shape
    targets: torch.Tensor         # same shape: the next token
    loss_mask: torch.Tensor       # same shape, bool
    seq_ids: torch.Tensor         # same shape, int64: which counted response (-1: none)
    response_slices: list[tuple[int, int, int]]
    """Per sample: (row, start, end) of its response-token predictions in the logits layout."""
    num_seqs: int
    """Responses that count in the loss; `seq_ids` numbers them 0 .. num_seqs - 1."""
    packed_seq_params: Optional[object] = None

    @property
    def shape(self) -> torch.Size:
        return self.tokens.shape


def build_padded(samples: Sequence[Sample], pad_id: int, pad_to: int = 1,
                 min_length: int = 0, min_rows: int = 0) -> ModelInputs:
    """One row per sample, right-padded to a multiple of `pad_to` (at least `min_length`);
    rows beyond the samples (up to `min_rows`) are all padding."""
    longest = max(max(s.num_tokens for s in samples), min_length)
    length = -(-longest // pad_to) * pad_to
    rows = max(len(samples), min_rows)
    tokens = torch.full((rows, length), pad_id, dtype=torch.long)
    loss_mask = torch.zeros((rows, length), dtype=torch.bool)
    seq_ids = torch.full((rows, length), -1, dtype=torch.long)
    slices = []
    counted = 0
    for b, s in enumerate(samples):
        ids = s.prompt_ids + s.response_ids
        tokens[b, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        start, end = len(s.prompt_ids) - 1, len(ids) - 1
        slices.append((b, start, end))
        if s.trainable():
            loss_mask[b, start:end] = True
            seq_ids[b, start:end] = counted
            counted += 1
    targets = torch.roll(tokens, -1, dims=1)
    targets[:, -1] = pad_id
    positions = torch.arange(length).expand(rows, length).contiguous()
    return ModelInputs(tokens, positions, targets, loss_mask, seq_ids, slices, counted)


def build_packed(samples: Sequence[Sample], pad_id: int, pad_to: int = 1) -> ModelInputs:
    """All samples in one row with THD packed-sequence parameters (each sample padded to a
    multiple of `pad_to`, which context parallelism and sequence parallelism require)."""
    from megatron.core.packed_seq_params import PackedSeqParams

    lengths = [-(-s.num_tokens // pad_to) * pad_to for s in samples]
    total = sum(lengths)
    tokens = torch.full((1, total), pad_id, dtype=torch.long)
    positions = torch.zeros((1, total), dtype=torch.long)
    targets = torch.full((1, total), pad_id, dtype=torch.long)
    loss_mask = torch.zeros((1, total), dtype=torch.bool)
    seq_ids = torch.full((1, total), -1, dtype=torch.long)
    cu = [0]
    slices = []
    counted = 0
    for s, n in zip(samples, lengths):
        ids = torch.tensor(s.prompt_ids + s.response_ids, dtype=torch.long)
        offset = cu[-1]
        tokens[0, offset: offset + len(ids)] = ids
        targets[0, offset: offset + len(ids) - 1] = ids[1:]
        positions[0, offset: offset + n] = torch.arange(n)
        start, end = offset + len(s.prompt_ids) - 1, offset + len(ids) - 1
        slices.append((0, start, end))
        if s.trainable():
            loss_mask[0, start:end] = True
            seq_ids[0, start:end] = counted
            counted += 1
        cu.append(offset + n)
    cu_seqlens = torch.tensor(cu, dtype=torch.int32)
    max_len = max(lengths)
    params = PackedSeqParams(
        qkv_format="thd", cu_seqlens_q=cu_seqlens, cu_seqlens_kv=cu_seqlens,
        cu_seqlens_q_padded=cu_seqlens, cu_seqlens_kv_padded=cu_seqlens,
        max_seqlen_q=max_len, max_seqlen_kv=max_len,
    )
    return ModelInputs(tokens, positions, targets, loss_mask, seq_ids, slices, counted, params)
