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
MIN_BUDGET_BYTES = 4 << 20
"""Working memory the nucleus may always use, so that tiny chunks or shards do not cut the
rows into one-row blocks, each costing its own collectives."""
_BYTES_PER_FALLBACK_ELEMENT = 64


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
    """
    num_rows = x_TV.shape[0]
    dev = x_TV.device
    out = Nucleus(*(torch.empty(num_rows, dtype=torch.float32, device=dev) for _ in range(5)),
                  cut_id=torch.empty(num_rows, dtype=torch.int64, device=dev))
    k = min(spec.top_k, shard.vocab_local)
    budget_bytes = max(budget_bytes, MIN_BUDGET_BYTES)
    block = max(1, budget_bytes // (_BYTES_PER_CANDIDATE * shard.size * k))
    # the crossing element: the first whose cumulative mass reaches ceil(p * S), at most S
    threshold = torch.minimum(torch.ceil(spec.top_p * sum_fixed_T.double()).long(), sum_fixed_T)
    for a in range(0, num_rows, block):
        sl = slice(a, min(a + block, num_rows))
        gathered = shard.all_gather(_local_candidates(x_TV[sl], shard, k))
        _select_block(x_TV[sl], max_T[sl], threshold[sl], sum_fixed_T[sl], gathered, shard,
                      spec, temperature, bits, budget_bytes, out, sl)
    return out


def _local_candidates(x_BV: torch.Tensor, shard: VocabShard, k: int) -> torch.Tensor:
    """[B, 2K + 1] float32: K values, K global ids (padding: -inf, ID_MASK), frontier."""
    rows, n = x_BV.shape
    out = torch.full((rows, 2 * k + 1), float("-inf"), dtype=torch.float32, device=x_BV.device)
    out[:, k: 2 * k] = float(ID_MASK)
    kk = min(k, n)
    if kk > 0:
        values, idx = torch.topk(x_BV, kk, dim=-1, sorted=False)
        out[:, :kk] = values
        out[:, k: k + kk] = idx + shard.start
        if n > k:  # otherwise every real id is a candidate and nothing can be missing
            out[:, 2 * k] = values.amin(-1)
    return out


def _select_block(x_BV, max_B, threshold_B, sum_fixed_B, gathered, shard, spec, temperature,
                  bits, budget_bytes, out: Nucleus, sl: slice) -> None:
    k = (gathered.shape[-1] - 1) // 2
    rows = gathered.shape[1]
    values = gathered[..., :k].permute(1, 0, 2).reshape(rows, -1)
    ids = gathered[..., k: 2 * k].permute(1, 0, 2).reshape(rows, -1).long()
    frontier = gathered[..., 2 * k].amax(0)
    keys, order = order_keys(values, ids).sort(dim=-1, descending=True)
    values = values.gather(-1, order)
    y = shift_into(values, max_B, temperature, torch.empty_like(values))
    e = torch.exp(y)
    cum = (e * float(2 ** bits)).long().cumsum(-1)
    cross = torch.searchsorted(cum, threshold_B.unsqueeze(1)).squeeze(1)
    found = cross < cum.shape[1]
    cross_c = cross.clamp(max=cum.shape[1] - 1).unsqueeze(1)
    cross_key = keys.gather(1, cross_c).squeeze(1)
    resolved = found & (values.gather(1, cross_c).squeeze(1) > frontier)

    member_key = cross_key + (1 if spec.rule == "exclusive" else 0)
    member = keys >= member_key.unsqueeze(1)
    stats = torch.stack(_member_sums(member, e, y), dim=1)
    unresolved = (~resolved).nonzero().squeeze(1)
    if unresolved.numel():
        lo = torch.where(found, cross_key, MIN_KEY)[unresolved]
        hi = _key_above(frontier[unresolved])
        fb_key, fb_stats = _fallback(x_BV[unresolved], max_B[unresolved],
                                     threshold_B[unresolved], lo, hi, shard, spec,
                                     temperature, bits, budget_bytes)
        member_key[unresolved] = fb_key
        stats[unresolved] = fb_stats
    _finish(stats, member_key, sum_fixed_B, bits, out, sl)


def _key_above(value: torch.Tensor) -> torch.Tensor:
    """The smallest key of any element with a value > `value` (+inf: above every key)."""
    keys = (order_keys(value, torch.full_like(value, ID_MASK, dtype=torch.int64)) >> ID_BITS)
    return torch.where(value == float("inf"), -MIN_KEY, (keys + 1) << ID_BITS)


def _member_sums(member: torch.Tensor, e: torch.Tensor, y: torch.Tensor):
    """(sum_N e, sum_N e * y, |N|) per row in float64; -inf outside N never meets a 0."""
    e64 = torch.where(member, e.double(), 0.0)
    ey = torch.where(member, e64 * y.double(), 0.0)
    return e64.sum(-1), ey.sum(-1), member.sum(-1).double()


def _finish(stats: torch.Tensor, member_key: torch.Tensor, sum_fixed: torch.Tensor, bits: int,
            out: Nucleus, sl: slice) -> None:
    s_n, u_n, size = stats.unbind(1)
    nonempty = size > 0
    s_safe = torch.where(nonempty, s_n, 1.0)
    out.entropy[sl] = torch.where(nonempty, torch.log(s_safe) - u_n / s_safe, 0.0)
    out.mass[sl] = s_n / (sum_fixed.double() * 2.0 ** -bits)
    out.size[sl] = size
    out.log_mass[sl] = torch.log(s_n)
    out.cut_value[sl], out.cut_id[sl] = cut_of_key(member_key)


def _fallback(x_GV, max_G, threshold_G, lo, hi, shard: VocabShard, spec: NucleusSpec,
              temperature: float, bits: int, budget_bytes: int):
    """Exact search for rows whose crossing the candidates could not settle.

    Invariant per row: mass(key >= lo) >= threshold > mass(key >= hi); each step asks the
    group for the mass above `_SEARCH_POINTS` keys spaced over (lo, hi) at once (one
    all-reduce), so the interval shrinks 257-fold per step; at the end hi = lo + 1 and lo is
    the crossing element's key. Returns (member key, [G, 3] member sums).
    """
    rows = x_GV.shape[0]
    group = max(1, budget_bytes // (_BYTES_PER_FALLBACK_ELEMENT * max(1, shard.vocab_local)))
    keys_out = torch.empty(rows, dtype=torch.int64, device=x_GV.device)
    stats_out = torch.empty(rows, 3, dtype=torch.float64, device=x_GV.device)
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
        stats = shard.all_reduce_sum(torch.stack(_member_sums(member, e, y), dim=1))
        keys_out[sl], stats_out[sl] = member_key, stats
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
