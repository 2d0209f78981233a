"""Exact nucleus crossing by a radix search over the order keys (spec 1.4, the fallback).

For rows whose crossing element the candidate rounds could not settle (a nucleus larger than
the candidates, or ties at a frontier). Per row the invariant

    mass(key >= lo) >= threshold > mass(key >= hi)

holds. The first step buckets all elements by y = (x - M) / T in 256 equal intervals (a
monotone float32 map, the same on every rank): every rank adds its elements' fixed-point
masses per bucket, one all-reduce sums the histograms, and only the elements of the bucket
holding the crossing are kept (with int64 keys); the buckets above it are members as a whole.
Each later step cuts [lo, hi) into 256 key buckets of a power-of-two width in the same way,
at least 128 times narrower each time. When hi = lo + 1, lo is the crossing element's key.
Integer masses make every step exact; the vocabulary is never gathered.

Shape legend: G rows of a group, V real local columns, M kept elements per row.
"""

from __future__ import annotations

import torch

from megarl.ops.order import MIN_KEY, cut_of_key, member_sums, order_keys
from megarl.ops.shard import VocabShard
from megarl.ops.softmax_stats import shift_into

BUCKET_BITS = 8
MIN_SEARCH_BUDGET = 32 << 20
"""Working memory the search may always use: every group of rows costs its own collectives."""
_BYTES_PER_ELEMENT = 48  # y, e, masses, bucket and the first step's temporaries


def search(x_GV: torch.Tensor, max_G: torch.Tensor, threshold_G: torch.Tensor,
           lo_G: torch.Tensor, hi_G: torch.Tensor, shard: VocabShard, *, rule: str,
           temperature: float, bits: int, budget_bytes: int):
    """The nucleus of rows `x_GV` (raw logits, real local columns) given valid bounds.

    Returns (member key: members are the elements with key >= it, [G, 4] int64 stats:
    sum_N e, sum_N e * y in fixed point, |N|, and how many elements tie with the cut value
    outside N).
    """
    rows, dev = x_GV.shape[0], x_GV.device
    cols = torch.arange(x_GV.shape[1], device=dev) + shard.start
    # the first step's buckets span [lowest y of the row, 0]: one MIN all-reduce for all rows
    low = torch.full((rows,), 0.0, device=dev)
    if x_GV.shape[1]:
        low = torch.minimum(low, shift_into(x_GV.amin(-1, keepdim=True), max_G, temperature,
                                            torch.empty(rows, 1, device=dev)).squeeze(1))
    # at most -1: a flat row (all y = 0) still gets a finite bucket scale
    low = shard.all_reduce_min(low).clamp_(LOWEST_Y, -1.0)
    group = max(1, max(budget_bytes, MIN_SEARCH_BUDGET)
                // (_BYTES_PER_ELEMENT * max(1, shard.vocab_local)))
    member_key = torch.empty(rows, dtype=torch.int64, device=dev)
    stats = torch.empty(rows, 4, dtype=torch.int64, device=dev)
    for a in range(0, rows, group):
        sl = slice(a, min(a + group, rows))
        x = x_GV[sl]
        y = shift_into(x, max_G[sl], temperature, torch.empty(x.shape, device=dev))
        e = torch.exp(y)
        first = _FirstStep(x, y, e, low[sl], threshold_G[sl], shard, bits)
        kept = first.kept(cols)
        lo, hi = _kept_bounds(kept["keys"], lo_G[sl], hi_G[sl], shard)
        crossing = _narrow(kept["keys"], kept["fixed"], lo, hi, threshold_G[sl], first.above,
                           shard)
        key = crossing + (1 if rule == "exclusive" else 0)
        member_key[sl] = key
        stats[sl] = shard.all_reduce_sum(first.above_sums(bits) + _kept_sums(kept, key, bits))
    return member_key, stats


LOWEST_Y = -104.0
"""exp() of float32 underflows to 0 below this: lower y weigh nothing and share bucket 0."""


class _FirstStep:
    """One histogram step over buckets uniform in y (a monotone float32 map, the same on
    every rank), then the elements of the crossing bucket only are kept."""

    def __init__(self, x, y, e, low, threshold, shard: VocabShard, bits: int):
        buckets = 1 << BUCKET_BITS
        scale = (buckets / -low).unsqueeze(1)  # low < 0: the row max has y = 0
        self.bucket = (y - low.unsqueeze(1)).mul_(scale).floor_().clamp_(0, buckets - 1).long()
        self.fixed = (e * float(2 ** bits)).long()
        hist = torch.zeros(x.shape[0], buckets, dtype=torch.int64, device=x.device)
        hist = shard.all_reduce_sum(hist.scatter_add_(1, self.bucket, self.fixed))
        at_least = hist.flip(1).cumsum(1).flip(1)
        self.crossing = (at_least >= threshold.unsqueeze(1)).sum(1, keepdim=True) - 1
        padded = torch.cat([at_least, torch.zeros_like(at_least[:, :1])], dim=1)
        self.above = padded.gather(1, self.crossing + 1).squeeze(1)  # whole buckets above
        self.x, self.y, self.e = x, y, e

    def kept(self, cols) -> dict:
        """Keys, masses, x, y, e of the crossing bucket's elements, left-packed per row."""
        packing = _Packing(self.bucket == self.crossing)
        row, col = packing.row, packing.col
        x = self.x[row, col]
        return {"keys": packing.pack(order_keys(x, cols[col]), MIN_KEY),
                "fixed": packing.pack(self.fixed[row, col], 0),
                "x": packing.pack(x.float(), float("-inf")),
                "y": packing.pack(self.y[row, col], float("-inf")),
                "e": packing.pack(self.e[row, col], 0.0)}

    def above_sums(self, bits: int) -> torch.Tensor:
        """[G, 4] int64 sums over this rank's elements in buckets above the crossing bucket."""
        above = self.bucket > self.crossing
        s, u, count = member_sums(above, self.e, self.y, bits)
        return torch.stack([s, u, count, torch.zeros_like(count)], 1)


def _kept_bounds(keys, lo, hi, shard: VocabShard):
    """Tighter valid bounds: the crossing bucket's smallest key, and one past its largest
    (every element above it is in a higher bucket). One MIN all-reduce for both."""
    big = torch.full((keys.shape[0],), -MIN_KEY, dtype=keys.dtype, device=keys.device)
    lowest, highest = big, -big  # a rank without kept elements does not narrow anything
    if keys.shape[1]:
        real = keys != MIN_KEY
        lowest = torch.where(real, keys, -MIN_KEY).amin(1)
        highest = torch.where(real, keys, MIN_KEY).amax(1)
    both = shard.all_reduce_min(torch.stack([lowest, -(highest + 1)], 1))
    return torch.maximum(lo, both[:, 0]), torch.minimum(hi, -both[:, 1])


def _kept_sums(kept: dict, key: torch.Tensor, bits: int) -> torch.Tensor:
    """[G, 4] int64 sums over the kept elements in N, and the kept ties with the cut left out."""
    member = kept["keys"] >= key.unsqueeze(1)
    cut_value, _ = cut_of_key(key)
    tie_outside = ((kept["x"] == cut_value.unsqueeze(1)) & ~member).sum(-1)
    return torch.stack([*member_sums(member, kept["e"], kept["y"], bits), tie_outside], 1)


def _narrow(keys, fixed, lo, hi, threshold, dropped_above, shard: VocabShard) -> torch.Tensor:
    """Radix steps on the kept elements until hi = lo + 1; returns lo (the crossing's key).

    `dropped_above` is the group's mass of elements no longer kept, all above the kept ones.
    """
    buckets = 1 << BUCKET_BITS
    while int((hi - lo).max()) > 1:  # the same on every rank: lo, hi come from all-reduces
        shift = _bucket_shift(hi - lo)
        bucket = (keys - lo.unsqueeze(1)) >> shift.unsqueeze(1)
        bucket = torch.where(keys >= hi.unsqueeze(1), buckets, bucket)
        bucket = torch.where(keys >= lo.unsqueeze(1), bucket, buckets + 1)  # ignored
        hist = torch.zeros(keys.shape[0], buckets + 2, dtype=torch.int64, device=keys.device)
        hist = shard.all_reduce_sum(hist.scatter_add_(1, bucket, fixed)[:, : buckets + 1])
        hist[:, buckets] += dropped_above
        at_least = hist.flip(1).cumsum(1).flip(1)  # mass(key >= lo + i << shift)
        i = ((at_least >= threshold.unsqueeze(1)).sum(1) - 1).unsqueeze(1)
        dropped_above = at_least.gather(1, i + 1).squeeze(1)
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
    packing = _Packing((keys >= lo.unsqueeze(1)) & (keys < hi.unsqueeze(1)))
    row, col = packing.row, packing.col
    return packing.pack(keys[row, col], MIN_KEY), packing.pack(fixed[row, col], 0)


class _Packing:
    """Where the selected entries of a [G, V] mask go when each row is packed to the left."""

    def __init__(self, selected_GV: torch.Tensor):
        self.row, self.col = selected_GV.nonzero(as_tuple=True)
        counts = torch.bincount(self.row, minlength=selected_GV.shape[0])
        start = counts.cumsum(0) - counts
        self.pos = torch.arange(self.row.numel(), device=self.row.device) - start[self.row]
        self.shape = (selected_GV.shape[0], int(counts.max()) if counts.numel() else 0)

    def pack(self, values: torch.Tensor, fill) -> torch.Tensor:
        """[G, M]: `values` (one per selected entry, in `nonzero` order), padded with `fill`."""
        out = torch.full(self.shape, fill, dtype=values.dtype, device=values.device)
        out[self.row, self.pos] = values
        return out
