"""Exact distributed top-p nucleus and the entropy inside it (spec 1.4).

Order and keys: see order.py. Masses and sums are int64 fixed point (softmax_stats,
order.member_sums): every cumulative sum is exact, so the nucleus, its entropy and its mass
do not depend on summation order or on the TP size.

Selection, per block of rows: each rank sends its local top-k (value, id) and its frontier
(ids with values at or below it may be missing) to all; every rank sorts the merged
candidates identically and finds the crossing element, the first whose cumulative mass
reaches p * S. If that element's value is above every frontier, all earlier elements are
present and the answer is exact. A small k settles typical rows; the rest get a round with
k = top_k, and what that cannot settle (a nucleus larger than the candidates, or ties at a
frontier) goes to the exact radix search of nucleus_search.py, which never gathers the
vocabulary.

Shape legend: T tokens, V real local columns, k candidates per rank, R ranks,
L = R * k merged candidates, G rows of a block.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megarl.ops.nucleus_grad import SPARSE_MEMBERS
from megarl.ops.nucleus_search import search
from megarl.ops.order import ID_BITS, ID_MASK, MIN_KEY, cut_of_key, member_sums, order_keys
from megarl.ops.shard import VocabShard
from megarl.ops.softmax_stats import shift_into

RULES = ("inclusive", "exclusive")

# Bytes of working memory per merged candidate (an upper estimate), used to size row blocks
# to the caller's memory budget.
_BYTES_PER_CANDIDATE = 64
_FIRST_STAGE_K = 32
_BLOCK = 32  # columns per block when pruning the local top-k by block maxima
MIN_BUDGET_BYTES = 4 << 20
"""Working memory the nucleus may always use, so that tiny chunks or shards do not cut the
rows into one-row blocks, each costing its own collectives."""


@dataclass(frozen=True)
class NucleusSpec:
    """What nucleus to take: cumulative mass `top_p` under `rule`, with `top_k` candidates."""

    top_p: float
    rule: str = "inclusive"
    top_k: int = 1024

    def __post_init__(self) -> None:
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"nucleus top_p={self.top_p} must be in (0, 1]")
        if self.rule not in RULES:
            raise ValueError(f"nucleus rule={self.rule!r} must be one of {RULES}")
        if self.top_k < 1:
            raise ValueError(f"nucleus top_k={self.top_k} must be >= 1")


@dataclass
class Nucleus:
    """Per-token nucleus results, each of shape [T]."""

    entropy: torch.Tensor  # float32, H_p (0 for an empty nucleus)
    mass: torch.Tensor  # float32, sum_N pi
    size: torch.Tensor  # float32, |N|
    log_mass: torch.Tensor  # float32, log sum_N exp(y) (-inf when empty), for backward
    cut_value: torch.Tensor  # float32: member iff x > cut_value, or x == cut_value and
    cut_id: torch.Tensor  # int64:    global id <= cut_id
    split: torch.Tensor  # bool: some x == cut_value is outside N (else member iff x >= it)
    dense: torch.Tensor  # bool: N is too large for a member list; backward compares with the cut
    member_rows: torch.Tensor | None = None  # int64 [P], ascending: row of each listed member
    member_ids: torch.Tensor | None = None  # int64 [P]: its global id (rows not dense only)


def select(x_TV: torch.Tensor, max_T: torch.Tensor, sum_fixed_T: torch.Tensor,
           shard: VocabShard, spec: NucleusSpec, *, temperature: float, bits: int,
           budget_bytes: int) -> Nucleus:
    """The nucleus of every row of this shard's real logits `x_TV` (raw, any float dtype).

    `max_T` is the global max of the raw logits per row, `sum_fixed_T` the global
    fixed-point mass sum. Every rank must call this with the same T (collectives inside).
    Rows go through candidate stages of growing K (`_stage_sizes`); what the last stage
    cannot settle goes to the exact search.
    """
    num_rows, dev = x_TV.shape[0], x_TV.device
    out = Nucleus(*(torch.zeros(num_rows, dtype=torch.float32, device=dev) for _ in range(5)),
                  cut_id=torch.zeros(num_rows, dtype=torch.int64, device=dev),
                  split=torch.zeros(num_rows, dtype=torch.bool, device=dev),
                  dense=torch.zeros(num_rows, dtype=torch.bool, device=dev))
    pairs, hopeless = [], []  # hopeless: rows no further candidate round can settle
    budget_bytes = max(budget_bytes, MIN_BUDGET_BYTES)
    # the crossing element: the first whose cumulative mass reaches ceil(p * S), at most S
    threshold = torch.minimum(torch.ceil(spec.top_p * sum_fixed_T.double()).long(), sum_fixed_T)
    args = (shard, spec, temperature, bits)
    pending = None  # all rows: the first stage takes row slices, never a copy of the input
    stages = _stage_sizes(spec.top_k, shard.vocab_local)
    for stage, k in enumerate(stages):
        k_next = stages[stage + 1] if stage + 1 < len(stages) else None
        per_row = _BYTES_PER_CANDIDATE * shard.size * k + 16 * min(shard.vocab_local, k * _BLOCK)
        step = max(1, budget_bytes // per_row)
        left = []
        for a in range(0, num_rows if pending is None else pending.numel(), step):
            if pending is None:
                rows = torch.arange(a, min(a + step, num_rows), device=dev)
                pick = slice(a, a + rows.numel())
            else:
                rows = pick = pending[a: a + step]
            res = _try_candidates(x_TV[pick], max_T[pick], threshold[pick], k, *args,
                                  k_next=k_next)
            done = res["resolved"]
            _store(out, rows[done], res["member_key"][done], res["stats"][done],
                   sum_fixed_T[rows[done]], bits)
            pairs.append(_member_pairs(out, rows[done], res["ids"][done]))
            for parts, keep in ((left, res["hopeful"]), (hopeless, ~res["hopeful"])):
                keep = keep & ~done
                parts.append((rows[keep], res["lo"][keep], res["hi"][keep]))
        pending, lo, hi = (torch.cat(t) for t in zip(*left))
        if pending.numel() == 0:  # the same on every rank: decided from gathered data
            break
    hopeless.append((pending, lo, hi))
    pending, lo, hi = (torch.cat(t) for t in zip(*hopeless))
    if pending.numel():
        key, stats = search(x_TV[pending], max_T[pending], threshold[pending], lo, hi, shard,
                            rule=spec.rule, temperature=temperature, bits=bits,
                            budget_bytes=budget_bytes)
        _store(out, pending, key, stats, sum_fixed_T[pending], bits)
        out.dense[pending] = True
    rows, ids = (torch.cat(t) for t in zip(*pairs))
    order = torch.argsort(rows, stable=True)
    out.member_rows, out.member_ids = rows[order], ids[order]
    return out


def _member_pairs(out: Nucleus, rows: torch.Tensor, ids_sorted: torch.Tensor):
    """(row, global id) of every member of the small nuclei of `rows`; marks the rest dense."""
    size = out.size[rows].long()
    small = size <= SPARSE_MEMBERS
    out.dense[rows[~small]] = True
    member = (torch.arange(ids_sorted.shape[1], device=rows.device) < size.unsqueeze(1))
    member &= small.unsqueeze(1)
    at = member.nonzero()
    return rows[at[:, 0]], ids_sorted[at[:, 0], at[:, 1]]


def _stage_sizes(top_k: int, vocab_local: int) -> tuple[int, ...]:
    """A small first K settles typical rows cheaply; `top_k` then takes the rest."""
    k = min(top_k, vocab_local)
    return (k,) if k <= _FIRST_STAGE_K else (_FIRST_STAGE_K, k)


def _try_candidates(x_GV, max_G, threshold_G, k, shard, spec, temperature, bits, *,
                    k_next: int | None = None) -> dict:
    """One candidate round: each rank's local top-k, gathered, merged identically everywhere.

    Returns per row: resolved (the crossing is provably among the candidates), member_key
    (members: key >= it), stats [G, 4] int64 (sum_N e, sum_N e y in fixed point, |N|, split),
    ids (candidates' global ids in order: N is a prefix), for unresolved rows the search bounds lo, hi, and
    hopeful: whether a round with k_next candidates per rank could reach p * S at all (every
    element not listed here weighs at most what the heavier of the frontier and the last
    candidate weigh). Every path is exact, so this only saves a futile round.
    """
    gathered = shard.all_gather(_local_candidates(x_GV, shard, k))
    rows = gathered.shape[1]
    values = gathered[..., :k].permute(1, 0, 2).reshape(rows, -1)
    ids = gathered[..., k: 2 * k].permute(1, 0, 2).reshape(rows, -1).long()
    frontier = gathered[..., 2 * k].amax(0)
    keys, order = order_keys(values, ids).sort(dim=-1, descending=True)
    values, ids = values.gather(-1, order), ids.gather(-1, order)
    y = shift_into(values, max_G, temperature, torch.empty_like(values))
    e = torch.exp(y)
    cum = (e * float(2 ** bits)).long().cumsum(-1)
    length = cum.shape[1]
    cross = torch.searchsorted(cum, threshold_G.unsqueeze(1)).squeeze(1)
    found = cross < length
    at_cross = cross.clamp(max=length - 1).unsqueeze(1)
    resolved = found & (values.gather(1, at_cross).squeeze(1) > frontier)
    size = cross + 1 if spec.rule == "inclusive" else cross
    last = (size - 1).clamp(0, length - 1).unsqueeze(1)
    # members are the first `size` candidates; an empty nucleus gets a key above all
    member_key = torch.where(size > 0, keys.gather(1, last).squeeze(1), keys[:, 0] + 1)
    after = size.clamp(max=length - 1).unsqueeze(1)
    split = (size > 0) & (size < length) & (
        values.gather(1, after).squeeze(1) == values.gather(1, last).squeeze(1))
    member = torch.arange(length, device=keys.device) < size.unsqueeze(1)
    stats = torch.stack([*member_sums(member, e, y, bits), split.long()], dim=1)
    lo = torch.where(found, keys.gather(1, at_cross).squeeze(1), MIN_KEY)
    hopeful = torch.zeros_like(found)
    if k_next is not None:
        heaviest_left = torch.maximum(frontier, values[:, -1])
        bound = shift_into(heaviest_left.unsqueeze(1), max_G, temperature,
                           torch.empty_like(heaviest_left.unsqueeze(1))).exp_()
        # in float64: a heuristic, and an int64 product could overflow on tiny vocabs
        reach = cum[:, -1].double() + shard.size * k_next * bound.squeeze(1).double() * 2.0 ** bits
        hopeful = reach >= threshold_G.double()
    return dict(resolved=resolved, member_key=member_key, stats=stats, ids=ids, lo=lo,
                hi=_key_above(frontier), hopeful=hopeful)


def _local_candidates(x_GV: torch.Tensor, shard: VocabShard, k: int) -> torch.Tensor:
    """[G, 2k + 1] float32: k values, k global ids (padding: -inf, ID_MASK), frontier."""
    rows, n = x_GV.shape
    out = torch.full((rows, 2 * k + 1), float("-inf"), dtype=torch.float32, device=x_GV.device)
    out[:, k: 2 * k] = float(ID_MASK)
    if n:
        values, cols, frontier = _local_top(x_GV, k)
        kk = values.shape[1]
        out[:, :kk], out[:, k: k + kk], out[:, 2 * k] = values, cols + shard.start, frontier
    return out


def _local_top(x_GV: torch.Tensor, k: int):
    """Up to k largest values per row, their columns, and a frontier: every element with a
    larger value is among them. Only the k blocks of `_BLOCK` columns with the largest
    maxima can hold the top k, so topk runs on those (block maxima are a cheap reduction)."""
    rows, n = x_GV.shape
    if n <= k:
        cols = torch.arange(n, device=x_GV.device).expand(rows, n)
        return x_GV.float(), cols, torch.full((rows,), float("-inf"), device=x_GV.device)
    if k * _BLOCK >= n:
        values, cols = torch.topk(x_GV, k, dim=-1, sorted=False)
        return values.float(), cols, values.amin(-1).float()
    full = n // _BLOCK * _BLOCK
    block_max = x_GV[:, :full].unflatten(1, (-1, _BLOCK)).amax(-1)
    if full < n:
        block_max = torch.cat([block_max, x_GV[:, full:].amax(-1, keepdim=True)], dim=1)
    top_max, top_blocks = torch.topk(block_max, k, dim=-1, sorted=False)
    cols = (top_blocks.unsqueeze(-1) * _BLOCK + torch.arange(_BLOCK, device=x_GV.device))
    cols = cols.flatten(1)
    values = x_GV.gather(1, cols.clamp(max=n - 1)).float().masked_fill_(cols >= n, float("-inf"))
    values, pick = torch.topk(values, k, dim=-1, sorted=False)
    return values, cols.gather(1, pick), torch.maximum(top_max.amin(-1).float(), values.amin(-1))


def _key_above(value: torch.Tensor) -> torch.Tensor:
    """The smallest key of any element with a value > `value` (+inf: above every key)."""
    keys = (order_keys(value, torch.full_like(value, ID_MASK, dtype=torch.int64)) >> ID_BITS)
    return torch.where(value == float("inf"), -MIN_KEY, (keys + 1) << ID_BITS)


def _store(out: Nucleus, rows: torch.Tensor, member_key: torch.Tensor, stats: torch.Tensor,
           sum_fixed: torch.Tensor, bits: int) -> None:
    unit = 2.0 ** -bits
    s_n, u_n = stats[:, 0].double() * unit, stats[:, 1].double() * unit
    size, split = stats[:, 2], stats[:, 3]
    nonempty = size > 0
    s_safe = torch.where(nonempty, s_n, 1.0)
    out.entropy[rows] = torch.where(nonempty, torch.log(s_safe) - u_n / s_safe, 0.0).float()
    out.mass[rows] = (s_n / (sum_fixed.double() * unit)).float()
    out.size[rows] = size.float()
    out.log_mass[rows] = torch.log(s_n).float()
    out.split[rows] = split > 0
    out.cut_value[rows], out.cut_id[rows] = cut_of_key(member_key)
