"""Exact distributed top-p nucleus and the entropy inside it (spec 1.4).

Order: probability descending, smaller global id first. Probabilities order exactly like the
raw logits, so the order is taken on the raw values (never on rounded probabilities, which
can tie where the logits do not). Each element gets an int64 key
(order-preserving bits of its float32 logit << 24) + (2**24 - 1 - id), so "key >= t" is
"comes no later than the element with key t".

Masses are int64 fixed point (`softmax_stats.fixed_point_bits`): every cumulative sum is
then exact, so the nucleus does not depend on summation order or on the TP size.

Selection, per block of rows: each rank sends its local top-K (value, id) and its frontier
(its K-th value: ids of that value may be missing) to all; every rank sorts the merged
candidates identically and finds the crossing element, the first whose cumulative mass
reaches p * S. If that element's value is above every frontier, all earlier elements are
present and the answer is exact. Otherwise (nucleus larger than the candidates, or ties at a
frontier) the row falls back to an exact search on the key: each step all-reduces the kept
mass at 256 trial keys, so about 7 steps settle a row; it never gathers the vocabulary.

Shape legend: T tokens, V real local columns, K candidates per rank, R ranks,
L = R * K merged candidates, G rows of a fallback group.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megarl.ops.shard import VocabShard
from megarl.ops.softmax_stats import shift_into

ID_BITS = 24
ID_MASK = (1 << ID_BITS) - 1
MIN_KEY = -(1 << 62)  # below every element's key
RULES = ("inclusive", "exclusive")

# Bytes of working memory per merged candidate and per fallback element (upper estimates),
# used to size row blocks to the caller's memory budget.
_BYTES_PER_CANDIDATE = 64
_BYTES_PER_SEARCH_ELEMENT = 64
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


def order_keys(values: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """int64 keys ordering (value descending, id ascending) as keys descending."""
    v = values.float() + 0.0  # -0.0 -> +0.0: equal floats must get equal keys
    bits = v.view(torch.int32)
    ordered = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits).to(torch.int64)
    return (ordered << ID_BITS) + (ID_MASK - ids)


def _value_of_ordered(ordered: torch.Tensor) -> torch.Tensor:
    bits = torch.where(ordered < 0, ordered ^ 0x7FFFFFFF, ordered).to(torch.int32)
    return bits.view(torch.float32)


def cut_of_key(keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(cut_value, cut_id) such that key(x, id) >= keys iff x > v or (x == v and id <= g)."""
    return _value_of_ordered(keys >> ID_BITS), ID_MASK - (keys & ID_MASK)


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
                  split=torch.zeros(num_rows, dtype=torch.bool, device=dev))
    budget_bytes = max(budget_bytes, MIN_BUDGET_BYTES)
    # the crossing element: the first whose cumulative mass reaches ceil(p * S), at most S
    threshold = torch.minimum(torch.ceil(spec.top_p * sum_fixed_T.double()).long(), sum_fixed_T)
    args = (shard, spec, temperature, bits)
    pending = torch.arange(num_rows, device=dev)
    lo = hi = None
    for k in _stage_sizes(spec.top_k, shard.vocab_local):
        per_row = _BYTES_PER_CANDIDATE * shard.size * k + 16 * min(shard.vocab_local, k * _BLOCK)
        left, lo_parts, hi_parts = [], [], []
        for rows in pending.split(max(1, budget_bytes // per_row)):
            res = _try_candidates(x_TV[rows], max_T[rows], threshold[rows], k, *args)
            done = res["resolved"]
            _store(out, rows[done], res["member_key"][done], res["stats"][done],
                   sum_fixed_T[rows[done]], bits)
            left.append(rows[~done])
            lo_parts.append(res["lo"][~done])
            hi_parts.append(res["hi"][~done])
        pending, lo, hi = torch.cat(left), torch.cat(lo_parts), torch.cat(hi_parts)
        if pending.numel() == 0:  # the same on every rank: decided from gathered data
            return out
    key, stats = _search(x_TV[pending], max_T[pending], threshold[pending], lo, hi, *args,
                         budget_bytes=budget_bytes)
    _store(out, pending, key, stats, sum_fixed_T[pending], bits)
    return out


def _stage_sizes(top_k: int, vocab_local: int) -> tuple[int, ...]:
    """A small first K settles typical rows cheaply; `top_k` then takes the rest."""
    k = min(top_k, vocab_local)
    return (k,) if k <= _FIRST_STAGE_K else (_FIRST_STAGE_K, k)


def _try_candidates(x_GV, max_G, threshold_G, k, shard, spec, temperature, bits) -> dict:
    """One candidate round: each rank's local top-k, gathered, merged identically everywhere.

    Returns per row: resolved (the crossing is provably among the candidates), member_key
    (members: key >= it), stats [G, 4] (sum_N e, sum_N e y, |N|, split), and for unresolved
    rows the search bounds lo, hi.
    """
    gathered = shard.all_gather(_local_candidates(x_GV, shard, k))
    rows = gathered.shape[1]
    values = gathered[..., :k].permute(1, 0, 2).reshape(rows, -1)
    ids = gathered[..., k: 2 * k].permute(1, 0, 2).reshape(rows, -1).long()
    frontier = gathered[..., 2 * k].amax(0)
    keys, order = order_keys(values, ids).sort(dim=-1, descending=True)
    values = values.gather(-1, order)
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
    stats = torch.stack([*_member_sums(member, e, y), split.double()], dim=1)
    lo = torch.where(found, keys.gather(1, at_cross).squeeze(1), MIN_KEY)
    return dict(resolved=resolved, member_key=member_key, stats=stats, lo=lo,
                hi=_key_above(frontier))


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


def _member_sums(member: torch.Tensor, e: torch.Tensor, y: torch.Tensor):
    """(sum_N e, sum_N e * y, |N|) per row in float64; -inf outside N never meets a 0."""
    e64 = torch.where(member, e.double(), 0.0)
    ey = torch.where(member, e64 * y.double(), 0.0)
    return e64.sum(-1), ey.sum(-1), member.sum(-1).double()


def _store(out: Nucleus, rows: torch.Tensor, member_key: torch.Tensor, stats: torch.Tensor,
           sum_fixed: torch.Tensor, bits: int) -> None:
    s_n, u_n, size, split = stats.unbind(1)
    nonempty = size > 0
    s_safe = torch.where(nonempty, s_n, 1.0)
    out.entropy[rows] = torch.where(nonempty, torch.log(s_safe) - u_n / s_safe, 0.0).float()
    out.mass[rows] = (s_n / (sum_fixed.double() * 2.0 ** -bits)).float()
    out.size[rows] = size.float()
    out.log_mass[rows] = torch.log(s_n).float()
    out.split[rows] = split > 0
    out.cut_value[rows], out.cut_id[rows] = cut_of_key(member_key)


def _search(x_GV, max_G, threshold_G, lo, hi, shard: VocabShard, spec: NucleusSpec,
            temperature: float, bits: int, *, budget_bytes: int):
    """Exact search for rows whose crossing the candidates could not settle.

    Invariant per row: mass(key >= lo) >= threshold > mass(key >= hi); each step asks the
    group for the mass above `_SEARCH_POINTS` keys spaced over (lo, hi) at once (one
    all-reduce), so the interval shrinks 257-fold per step; at the end hi = lo + 1 and lo is
    the crossing element's key. Returns (member key, [G, 4] stats as in _try_candidates).
    """
    rows = x_GV.shape[0]
    group = max(1, budget_bytes // (_BYTES_PER_SEARCH_ELEMENT * max(1, shard.vocab_local)))
    keys_out = torch.empty(rows, dtype=torch.int64, device=x_GV.device)
    stats_out = torch.empty(rows, 4, dtype=torch.float64, device=x_GV.device)
    cols = torch.arange(x_GV.shape[1], device=x_GV.device) + shard.start
    for a in range(0, rows, group):
        sl = slice(a, min(a + group, rows))
        x = x_GV[sl]
        keys = order_keys(x, cols.unsqueeze(0))
        y = shift_into(x, max_G[sl], temperature, torch.empty(x.shape, device=x.device))
        e = torch.exp(y)
        mass_above = _MassAbove(keys, (e * float(2 ** bits)).long())
        lo_g, hi_g = lo[sl].clone(), hi[sl].clone()
        for _ in range(_search_steps(int((hi_g - lo_g).max().item()))):
            points = _spaced_points(lo_g, hi_g)
            ok = shard.all_reduce_sum(mass_above(points)) >= threshold_G[sl].unsqueeze(1)
            n_ok = ok.sum(-1, keepdim=True)  # ok is True on a prefix: mass falls as keys rise
            padded = torch.cat([lo_g.unsqueeze(1), points, hi_g.unsqueeze(1)], dim=1)
            lo_g = padded.gather(1, n_ok).squeeze(1)
            hi_g = padded.gather(1, n_ok + 1).squeeze(1)
        member_key = lo_g + (1 if spec.rule == "exclusive" else 0)
        member = keys >= member_key.unsqueeze(1)
        cut_value, _ = cut_of_key(member_key)
        left_out_tie = ((x == cut_value.unsqueeze(1)) & ~member).sum(-1).double()
        stats = torch.stack([*_member_sums(member, e, y), left_out_tie], dim=1)
        keys_out[sl], stats_out[sl] = member_key, shard.all_reduce_sum(stats)
    return keys_out, stats_out


_SEARCH_POINTS = 256


def _search_steps(width: int) -> int:
    steps = 0
    while width > 1:
        width = -(-width // (_SEARCH_POINTS + 1))
        steps += 1
    return steps


def _spaced_points(lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """[G, P] keys lo + floor(i * (hi - lo) / (P + 1)), i = 1..P, without int64 overflow."""
    i = torch.arange(1, _SEARCH_POINTS + 1, device=lo.device)
    width = (hi - lo).unsqueeze(1)
    whole, part = width // (_SEARCH_POINTS + 1), width % (_SEARCH_POINTS + 1)
    return lo.unsqueeze(1) + whole * i + part * i // (_SEARCH_POINTS + 1)


class _MassAbove:
    """Local fixed-point mass of the elements with key >= t, for many t per row at once."""

    def __init__(self, keys_GV: torch.Tensor, fixed_GV: torch.Tensor) -> None:
        self.sorted_keys, order = keys_GV.sort(dim=-1)
        suffix = fixed_GV.gather(1, order).flip(1).cumsum(1).flip(1)
        self.suffix = torch.cat([suffix, suffix.new_zeros(suffix.shape[0], 1)], dim=1)

    def __call__(self, points_GP: torch.Tensor) -> torch.Tensor:
        first = torch.searchsorted(self.sorted_keys, points_GP)  # first element with key >= t
        return self.suffix.gather(1, first)
