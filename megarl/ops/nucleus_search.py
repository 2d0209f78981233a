"""Exact nucleus crossing by a radix search over the order keys (spec 1.4, the fallback).

For rows whose crossing element the candidate rounds could not settle (a nucleus larger than
the candidates, or ties at a frontier). Per row the invariant

    mass(key >= lo) >= threshold > mass(key >= hi)

holds. Each step cuts [lo, hi) into 256 buckets of a power-of-two width; every rank adds its
elements' fixed-point masses per bucket (and above hi), one all-reduce sums the histograms,
and the bucket holding the crossing becomes the new [lo, hi), at least 128 times narrower;
ranks then keep only their elements inside it. When hi = lo + 1, lo is the crossing
element's key. Integer masses make every step exact; the vocabulary is never gathered.

Shape legend: G rows of a group, V real local columns, M kept elements per row.
"""

from __future__ import annotations

import torch

from megarl.ops.order import ID_MASK, MIN_KEY, cut_of_key, member_sums, order_keys
from megarl.ops.shard import VocabShard
from megarl.ops.softmax_stats import shift_into

BUCKET_BITS = 8
MIN_SEARCH_BUDGET = 32 << 20
"""Working memory the search may always use: every group of rows costs its own collectives."""
_BYTES_PER_ELEMENT = 48  # keys, masses, y, e and the first step's temporaries


def search(x_GV: torch.Tensor, max_G: torch.Tensor, threshold_G: torch.Tensor,
           lo_G: torch.Tensor, hi_G: torch.Tensor, shard: VocabShard, *, rule: str,
           temperature: float, bits: int, budget_bytes: int):
    """The nucleus of rows `x_GV` (raw logits, real local columns) given valid bounds.

    Returns (member key: members are the elements with key >= it, [G, 4] float64 stats:
    sum_N e, sum_N e * y, |N|, and how many elements tie with the cut value outside N).
    """
    rows, dev = x_GV.shape[0], x_GV.device
    cols = torch.arange(x_GV.shape[1], device=dev) + shard.start
    # no element lies below its row's smallest value: a tighter lo, so that the first
    # buckets follow the values present (one MIN all-reduce for every row)
    lo_G = torch.maximum(lo_G, shard.all_reduce_min(_lowest_key(x_GV)))
    group = max(1, max(budget_bytes, MIN_SEARCH_BUDGET)
                // (_BYTES_PER_ELEMENT * max(1, shard.vocab_local)))
    member_key = torch.empty(rows, dtype=torch.int64, device=dev)
    stats = torch.empty(rows, 4, dtype=torch.float64, device=dev)
    for a in range(0, rows, group):
        sl = slice(a, min(a + group, rows))
        x = x_GV[sl]
        keys = order_keys(x, cols.unsqueeze(0))
        y = shift_into(x, max_G[sl], temperature, torch.empty(x.shape, device=dev))
        e = torch.exp(y)
        crossing = _narrow(keys, (e * float(2 ** bits)).long(), lo_G[sl], hi_G[sl],
                           threshold_G[sl], shard)
        key = crossing + (1 if rule == "exclusive" else 0)
        member = keys >= key.unsqueeze(1)
        cut_value, _ = cut_of_key(key)
        tie_outside = ((x == cut_value.unsqueeze(1)) & ~member).sum(-1).double()
        member_key[sl] = key
        stats[sl] = shard.all_reduce_sum(torch.stack([*member_sums(member, e, y), tie_outside], 1))
    return member_key, stats


def _lowest_key(x_GV: torch.Tensor) -> torch.Tensor:
    """A key at or below every local element's (+inf's key for a shard without columns)."""
    if x_GV.shape[1] == 0:
        low = torch.full((x_GV.shape[0],), float("inf"), device=x_GV.device)
    else:
        low = x_GV.amin(-1).float()
    return order_keys(low, torch.full_like(low, ID_MASK, dtype=torch.int64))


def _narrow(keys_GV, fixed_GV, lo, hi, threshold, shard: VocabShard) -> torch.Tensor:
    """Radix steps until hi = lo + 1 on every row; returns lo (the crossing's key)."""
    keys, fixed, above = keys_GV, fixed_GV, None
    buckets = 1 << BUCKET_BITS
    while int((hi - lo).max()) > 1:  # the same on every rank: lo, hi come from all-reduces
        shift = _bucket_shift(hi - lo)
        bucket = (keys - lo.unsqueeze(1)) >> shift.unsqueeze(1)
        # above hi: one column, unless that mass is already known (then ignored)
        bucket = torch.where(keys >= hi.unsqueeze(1), buckets + (above is not None), bucket)
        bucket = torch.where(keys >= lo.unsqueeze(1), bucket, buckets + 1)  # ignored
        hist = torch.zeros(keys.shape[0], buckets + 2, dtype=torch.int64, device=keys.device)
        hist = shard.all_reduce_sum(hist.scatter_add_(1, bucket, fixed)[:, : buckets + 1])
        if above is not None:  # elements above hi were dropped: their mass is known
            hist[:, buckets] += above
        at_least = hist.flip(1).cumsum(1).flip(1)  # mass(key >= lo + i << shift)
        i = ((at_least >= threshold.unsqueeze(1)).sum(1) - 1).unsqueeze(1)
        above = at_least.gather(1, i + 1).squeeze(1)
        lo, hi = lo + (i.squeeze(1) << shift), torch.minimum(hi, lo + ((i.squeeze(1) + 1) << shift))
        keys, fixed = _keep_inside(keys, fixed, lo, hi)
    return lo


def _bucket_shift(width: torch.Tensor) -> torch.Tensor:
    """Smallest s >= 0 with 256 << s >= width (per row)."""
    _, exponent = torch.frexp(width.double())
    shift = (exponent - BUCKET_BITS).clamp(min=0).long()
    # int64 -> float64 may round up to a power of two and down by one too many
    shift = shift - ((shift > 0) & ((1 << BUCKET_BITS) << (shift - 1).clamp(min=0) >= width)).long()
    return shift + ((1 << BUCKET_BITS) << shift < width).long()


def _keep_inside(keys, fixed, lo, hi):
    """The elements with lo <= key < hi, left-packed per row (padding: MIN_KEY, mass 0)."""
    inside = (keys >= lo.unsqueeze(1)) & (keys < hi.unsqueeze(1))
    counts = inside.sum(1)
    width = int(counts.max())
    if width * 2 > keys.shape[1]:
        return keys, fixed
    row, col = inside.nonzero(as_tuple=True)
    pos = torch.arange(row.numel(), device=keys.device) - (counts.cumsum(0) - counts)[row]
    packed_keys = torch.full((keys.shape[0], width), MIN_KEY, dtype=keys.dtype, device=keys.device)
    packed_fixed = torch.zeros((keys.shape[0], width), dtype=fixed.dtype, device=keys.device)
    packed_keys[row, pos], packed_fixed[row, pos] = keys[row, col], fixed[row, col]
    return packed_keys, packed_fixed
