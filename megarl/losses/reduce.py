"""Aggregation of per-token values into one optimizer step's loss, and the reductions it needs.

Legend: T = tokens of one micro-batch (flattened; several responses may be packed in a row),
S = responses (sequences) of that micro-batch, identified per token by `seq_ids_T`.

Every aggregation mode of spec section 2 is a weighted sum `agg(x) = sum_t x_t * w_t` whose
per-token weights `w_t` depend only on the mask, the response of each token and the step's
global normalisers (valid tokens and responses over all micro-batches and all data-parallel
ranks of the optimizer step). A micro-batch's `agg` is therefore its exact share of the step's
aggregate: summed over micro-batches and DP ranks it gives the global value, whatever the
micro-batch size or DP size.

Process groups are explicit; `group=None` means "no data parallelism" (one rank), never the
world group, because the world also holds the tensor- and pipeline-parallel ranks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.distributed as dist

TOKEN_MEAN = "token-mean"
SEQ_MEAN_TOKEN_MEAN = "seq-mean-token-mean"
SEQ_MEAN_TOKEN_SUM_NORM = "seq-mean-token-sum-norm"


def all_reduce(tensor: torch.Tensor, group: Optional[dist.ProcessGroup],
               op: dist.ReduceOp = dist.ReduceOp.SUM) -> torch.Tensor:
    """In-place all-reduce over `group`; a no-op for `group=None` (a single rank).

    Step-level inputs (masks, rewards) may live on the host while the group is NCCL: such a
    tensor makes the round trip through the current CUDA device.
    """
    if group is None or dist.get_world_size(group) == 1:
        return tensor
    if tensor.device.type == "cpu" and dist.get_backend(group) == "nccl":
        on_device = tensor.to(torch.device("cuda", torch.cuda.current_device()))
        dist.all_reduce(on_device, op=op, group=group)
        return tensor.copy_(on_device)
    dist.all_reduce(tensor, op=op, group=group)
    return tensor


def segment_sum(values_T: torch.Tensor, mask_T: torch.Tensor, seq_ids_T: torch.Tensor,
                num_seqs: int) -> torch.Tensor:
    """Per-response sums [S] of `values_T` over the valid tokens (mask) of each response.

    Tokens outside the mask may carry any sequence id (e.g. -1 for padding): they go to an
    overflow slot that is dropped.
    """
    slot_T = torch.where(mask_T, seq_ids_T, num_seqs)
    out = torch.zeros(num_seqs + 1, dtype=values_T.dtype, device=values_T.device)
    out.index_add_(0, slot_T, torch.where(mask_T, values_T, 0))
    return out[:num_seqs]


def per_token(values_S: torch.Tensor, mask_T: torch.Tensor, seq_ids_T: torch.Tensor) -> torch.Tensor:
    """Broadcast per-response values [S] to tokens [T]; 0 on tokens outside the mask."""
    safe_T = torch.where(mask_T, seq_ids_T, 0)
    if values_S.numel() == 0:
        return torch.zeros(mask_T.shape, dtype=values_S.dtype, device=mask_T.device)
    return torch.where(mask_T, values_S[safe_T], 0)


def seq_mean_weights(mask_T: torch.Tensor, seq_ids_T: torch.Tensor, num_seqs: int,
                     total_seqs: float) -> torch.Tensor:
    """Weights [T] that turn a sum into "mean over responses of each response's token mean".

    `w_t = m_t / (n_valid[seq_t] * total_seqs)`; a response without valid tokens adds nothing
    but still counts in `total_seqs`.
    """
    counts_S = segment_sum(torch.ones(mask_T.shape, device=mask_T.device), mask_T, seq_ids_T,
                           num_seqs)
    inv_S = 1.0 / (counts_S.clamp(min=1.0) * max(total_seqs, 1.0))
    return per_token(inv_S, mask_T, seq_ids_T)


@dataclass(frozen=True)
class StepNormalizers:
    """Totals over every micro-batch of one optimizer step on every data-parallel rank."""

    num_tokens: float
    """Valid (masked-in) tokens."""

    num_seqs: float
    """Responses."""

    @classmethod
    def compute(cls, micro_batches: Sequence, group: Optional[dist.ProcessGroup]) -> "StepNormalizers":
        """Sum this rank's micro-batches (objects with `mask` and `num_seqs`), all-reduce over
        `group` (collective)."""
        if micro_batches:
            device = micro_batches[0].mask.device
            tokens = torch.stack([mb.mask.sum() for mb in micro_batches]).sum().double()
        else:
            device, tokens = torch.device("cpu"), torch.zeros((), dtype=torch.float64)
        seqs = float(sum(mb.num_seqs for mb in micro_batches))
        totals = torch.stack([tokens.to(device), torch.tensor(seqs, dtype=torch.float64,
                                                              device=device)])
        all_reduce(totals, group)
        num_tokens, num_seqs = totals.tolist()
        return cls(num_tokens=num_tokens, num_seqs=num_seqs)


class Aggregator:
    """The reducer of spec section 2: per-token weights for one of the three modes.

    token-mean:              w_t = m_t / N_tokens
    seq-mean-token-mean:     w_t = m_t / (n_valid(seq_t) * N_seqs)
    seq-mean-token-sum-norm: w_t = m_t / (N_seqs * max_response_length)   (Dr.GRPO)
    N_tokens and N_seqs are the step's global totals (`StepNormalizers`).
    """

    MODES = (TOKEN_MEAN, SEQ_MEAN_TOKEN_MEAN, SEQ_MEAN_TOKEN_SUM_NORM)

    def __init__(self, mode: str, max_response_length: int) -> None:
        if mode not in self.MODES:
            raise ValueError(f"aggregation mode {mode!r} is not one of {self.MODES}")
        if max_response_length <= 0:
            raise ValueError(f"max_response_length must be positive, got {max_response_length}")
        self.mode = mode
        self.max_response_length = max_response_length

    def token_weights(self, mask_T: torch.Tensor, seq_ids_T: torch.Tensor, num_seqs: int,
                      norm: StepNormalizers) -> torch.Tensor:
        """Weights [T] (float32) so that `(x_T * w_T).sum()` is this micro-batch's share of
        `agg(x)` over the step."""
        if self.mode == SEQ_MEAN_TOKEN_MEAN:
            return seq_mean_weights(mask_T, seq_ids_T, num_seqs, norm.num_seqs).float()
        denom = (norm.num_tokens if self.mode == TOKEN_MEAN
                 else norm.num_seqs * self.max_response_length)
        return mask_T.float() / max(denom, 1.0)


def segment_quantile(values_T: torch.Tensor, mask_T: torch.Tensor, seq_ids_T: torch.Tensor,
                     num_seqs: int, q: float) -> torch.Tensor:
    """The q-quantile [S] (float64) of each response's valid values, linear interpolation.

    As numpy's default ("linear"): sort the response's n values v_0 <= ... <= v_{n-1}, take the
    position q * (n - 1) and interpolate between its two neighbours. A response without valid
    tokens gets +inf. Works on packed layouts: responses are told apart by `seq_ids_T`.
    """
    values = values_T.detach().double()
    slot_T = torch.where(mask_T, seq_ids_T, num_seqs)
    # Sort by value, then (stably) by slot: each response's values end up contiguous, ascending.
    order = torch.argsort(values, stable=True)
    order = order[torch.argsort(slot_T[order], stable=True)]
    sorted_vals = values[order]
    counts_S = torch.bincount(slot_T, minlength=num_seqs + 1)[:num_seqs]
    starts_S = torch.cumsum(counts_S, 0) - counts_S
    pos_S = q * (counts_S - 1).clamp(min=0).double()
    lo_S = pos_S.floor().long()
    hi_S = torch.minimum(lo_S + 1, (counts_S - 1).clamp(min=0))
    frac_S = pos_S - lo_S.double()
    if sorted_vals.numel() == 0:
        return torch.full((num_seqs,), float("inf"), dtype=torch.float64, device=values.device)
    last = sorted_vals.numel() - 1
    v_lo = sorted_vals[(starts_S + lo_S).clamp(max=last)]
    v_hi = sorted_vals[(starts_S + hi_S).clamp(max=last)]
    tau_S = v_lo + frac_S * (v_hi - v_lo)
    return torch.where(counts_S > 0, tau_S, float("inf"))
