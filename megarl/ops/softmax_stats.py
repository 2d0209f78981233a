"""Local math of spec 1.1 / 1.2 on one chunk of tokens of one vocab shard.

Nothing here communicates: the autograd Function in `token_stats.py` calls these per chunk
and exchanges only the per-token results. Everything is float32 except the sums, and works
in place on caller-owned buffers so that a chunk costs one float32 [C, V] buffer plus
sub-block temporaries (`SUB_BLOCKS`), never a copy of the whole input.

All values are relative to the global row max M of the tempered logits: y = (x - M) / T <= 0,
e = exp(y), S = sum e, so log p = y - log S.

Shape legend: C tokens of the chunk, V real columns of the local shard, B rows of a sub-block.
"""

from __future__ import annotations

import torch

SUB_BLOCKS = 8
"""The second temporary covers 1/SUB_BLOCKS of the chunk (the 0.125 in the memory bound)."""

NEG_FLOOR = -1.0e4
"""Stand-in for -inf logits where they would meet a 0 factor: far below exp's float32
underflow (about -104) so exp() is still exactly 0, yet finite so 0 * NEG_FLOOR = 0."""


def fixed_point_bits(real_vocab: int) -> int:
    """Binary digits of the fixed-point sums: a whole row's sum stays below 2**62 (e <= 1 and
    |e * y| <= 1/e per element)."""
    return 62 - (real_vocab - 1).bit_length()


def shift_into(x_CV: torch.Tensor, max_C: torch.Tensor, temperature: float,
               out_CV: torch.Tensor) -> torch.Tensor:
    """out = (x - M) / T in float32; x - M first, because it is exact for close values
    (logits of magnitude 1e4 keep their small differences)."""
    torch.sub(x_CV, max_C.unsqueeze(1), out=out_CV)
    if temperature != 1.0:
        out_CV.div_(temperature)
    return out_CV


def row_blocks(num_rows: int, sub_rows: int):
    """Successive row slices of at most `sub_rows` rows."""
    for a in range(0, num_rows, sub_rows):
        yield slice(a, min(a + sub_rows, num_rows))


def target_values(y_CV: torch.Tensor, local_C: torch.Tensor, owned_C: torch.Tensor) -> torch.Tensor:
    """y at each row's target column where this shard owns the target, else 0."""
    idx = torch.where(owned_C, local_C, 0).unsqueeze(1)
    return torch.where(owned_C, y_CV.gather(1, idx).squeeze(1), 0.0)


def chunk_sums(y_CV: torch.Tensor, tmp_BV: torch.Tensor, sums_C: torch.Tensor,
               u_C: torch.Tensor | None, bad_C: torch.Tensor | None, *, bits: int,
               block: int) -> None:
    """Per-row partial sums of one shard as exact int64 fixed point (`block_sums`, `to_fixed`).

    sums = sum e; u = sum e * y (when `u_C` is given). Exact integer sums do not depend on
    the order or on how the vocab is split, so every output is the same for every TP size
    (spec 1.4 asks it of the nucleus; here it holds for all statistics). Rows whose y holds
    -inf make e * y = 0 * -inf = NaN: they are flagged in `bad_C` and recomputed once per
    call (`fixed_sum_e_y_clamped`); checking here would cost a device sync per block.
    """
    for sl in row_blocks(y_CV.shape[0], tmp_BV.shape[0]):
        y = y_CV[sl]
        e = torch.exp(y, out=tmp_BV[: y.shape[0]])
        sums_C[sl] = to_fixed(block_sums(e, block), bits)
        if u_C is not None:
            partial = block_sums(e.mul_(y), block)
            bad = torch.isnan(partial)
            bad_C[sl] = bad.any(-1)
            u_C[sl] = to_fixed(partial.masked_fill_(bad, 0.0), bits)


MASS_BLOCK = 128
"""Ids per block of the exact sums when a shard's width is a multiple of it (Megatron pads the
vocab to 128 x TP); otherwise every element is its own block (exact too, but slower)."""


def mass_block(vocab_local: int) -> int:
    """The block size `block_sums` can use for shards of this width."""
    return MASS_BLOCK if vocab_local % MASS_BLOCK == 0 else 1


def block_sums(v_BV: torch.Tensor, block: int) -> torch.Tensor:
    """float32 sums over consecutive column blocks (the last one zero-padded).

    Blocks start at the shard's first column, i.e. at multiples of `block` in global ids,
    and each is summed by an explicit pairwise tree of elementwise adds: IEEE-exact, so the
    same bits for every shape, TP size and device. Block 1: the values themselves.
    """
    if block == 1:
        return v_BV
    rows, n = v_BV.shape
    full = n // block * block
    parts = [_tree_sum(v_BV[:, :full].unflatten(1, (-1, block)))] if full else []
    if full < n:  # the real vocab ends inside this block
        tail = v_BV.new_zeros(rows, block)
        tail[:, : n - full] = v_BV[:, full:]
        parts.append(_tree_sum(tail).unsqueeze(1))
    return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]


def to_fixed(blocks_BN: torch.Tensor, bits: int) -> torch.Tensor:
    """Sum per row of the blocks, each scaled by 2**bits (exact) and truncated to int64."""
    return (blocks_BN * float(2 ** bits)).long().sum(-1)


def _tree_sum(v: torch.Tensor) -> torch.Tensor:
    """Sum over the last dim (a power of two) by halving: a fixed order of IEEE adds."""
    width = v.shape[-1] // 2
    while width:
        v = v[..., :width] + v[..., width: 2 * width]
        width //= 2
    return v.squeeze(-1)


def fixed_sum_e_y_clamped(y_BV: torch.Tensor, bits: int, block: int) -> torch.Tensor:
    """sum e * y per row as in `chunk_sums`, with -inf entries counted as 0."""
    y = y_BV.clamp(min=NEG_FLOOR)
    return to_fixed(block_sums(torch.exp(y) * y, block), bits)


def chunk_grad(y_CV: torch.Tensor, out_CV: torch.Tensor, coef: dict, nucleus=None, *,
               row0: int, sub_rows: int, x_CV: torch.Tensor | None = None) -> None:
    """Write d(loss)/dx for one chunk (rows row0...) into `out_CV` (the logits' dtype).

    Destroys y_CV. With y' = y - log S (= log p), the log-prob and entropy terms are
    p * (a1 + b1 * y') (spec 1.1, 1.2) plus the log-prob's one-hot; the per-row
    coefficients in `coef` carry the upstream weights and 1/T. Keys: "log_s", "a1",
    optional "b1", "clamp_rows" (chunk rows with -inf logits, a host list, where y' meets
    b1), optional "target" = (local column, weight) (weight 0 where another shard owns the
    target).
    `nucleus` (a nucleus_grad.NucleusGrad) adds the nucleus entropy's term.
    """
    y_CV.sub_(coef["log_s"].unsqueeze(1))
    for r in coef.get("clamp_rows", ()):
        y_CV[r].clamp_(min=NEG_FLOOR)
    direct = out_CV.dtype == torch.float32
    tmp = None if direct else torch.empty((min(sub_rows, y_CV.shape[0]), y_CV.shape[1]),
                                          dtype=torch.float32, device=y_CV.device)
    for sl in row_blocks(y_CV.shape[0], sub_rows):
        y = y_CV[sl]
        terms = None if nucleus is None else nucleus.terms(x_CV[sl], row0 + sl.start, y)
        p = out_CV[sl] if direct else tmp[: y.shape[0]]
        torch.exp(y, out=p).mul_(_grad_factor(y, coef, sl))
        if "target" in coef:
            cols, weight = coef["target"]
            p.scatter_add_(1, cols[sl].unsqueeze(1), weight[sl].unsqueeze(1))
        if terms is not None:
            nucleus.apply(p, terms)
        if not direct:
            out_CV[sl].copy_(p)


def _grad_factor(y: torch.Tensor, coef: dict, sl: slice) -> torch.Tensor:
    """a1 + b1 * y', in y's storage when there is a b1."""
    a1 = coef["a1"][sl].unsqueeze(1)
    if "b1" in coef:
        return y.mul_(coef["b1"][sl].unsqueeze(1)).add_(a1)
    return a1
