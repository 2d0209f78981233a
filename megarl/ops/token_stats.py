"""Vocab-parallel log-probs, entropy and nucleus entropy in one fused, memory-bounded pass.

Forward, for logits sharded by vocab over the tensor-parallel group (spec section 1):
  1. the row max M of the raw logits: one MAX all-reduce;
  2. per token chunk: y = (x - M) / T in one float32 buffer, the target's y, sum e and
     sum e * y (e = exp y; with a nucleus, sum e as exact fixed point); then one SUM
     all-reduce of the stacked per-token sums;
  3. (nucleus only) candidate rounds and, rarely, an exact search (nucleus.py), which
     exchange at most K candidates or 256-bucket histograms per token.
Backward recomputes y chunk by chunk from the saved input and per-token scalars and needs
no communication; the nucleus term touches only the members of N (nucleus_grad.py).
Extra memory is one float32 [chunk, V_loc] buffer plus about 1/8 of that, and O(T).

Shape legend: T tokens (all leading dims flattened), V_loc local shard width, V real local
columns.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from megarl.ops import nucleus as nuc
from megarl.ops import softmax_stats as sm
from megarl.ops.nucleus_grad import NucleusGrad
from megarl.ops.shard import VocabShard

DEFAULT_CHUNK_SIZE = 4096
"""Tokens per chunk on CUDA: the working buffer is chunk x V_loc float32."""
CPU_CHUNK_BYTES = 8 << 20
"""On CPU the default chunk keeps the buffer at 8 MiB: larger blocks come from fresh mmaps
(page faults on every call) and miss the caches, which costs more than the extra chunks."""


def default_chunk_size(vocab_local: int, device: torch.device) -> int:
    """Tokens per chunk when the caller gives none."""
    if device.type == "cpu":
        return max(1, min(DEFAULT_CHUNK_SIZE, CPU_CHUNK_BYTES // (4 * max(1, vocab_local))))
    return DEFAULT_CHUNK_SIZE

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_OUTPUTS = ("log_probs", "entropy", "nucleus_entropy", "nucleus_mass", "nucleus_size")


@dataclass
class TokenStats:
    """Per-token statistics (float32, shape of the logits without the vocab dim); None when
    not requested. log_probs, entropy and nucleus_entropy are differentiable together."""

    log_probs: torch.Tensor | None = None
    entropy: torch.Tensor | None = None
    nucleus_entropy: torch.Tensor | None = None
    nucleus_mass: torch.Tensor | None = None
    nucleus_size: torch.Tensor | None = None


@dataclass(frozen=True)
class _Plan:
    shard: VocabShard
    temperature: float
    chunk_size: int
    log_probs: bool
    entropy: bool
    nucleus: nuc.NucleusSpec | None

    @property
    def bits(self) -> int:
        return sm.fixed_point_bits(self.shard.real_vocab)

    @property
    def block(self) -> int:
        return sm.mass_block(self.shard.vocab_local)

    @property
    def sub_rows(self) -> int:
        return max(1, self.chunk_size // sm.SUB_BLOCKS)


def vocab_parallel_token_stats(
    logits: torch.Tensor, targets: torch.Tensor | None = None, *,
    tp_group: dist.ProcessGroup | None = None, temperature: float = 1.0,
    real_vocab_size: int | None = None, log_probs: bool = True, entropy: bool = False,
    nucleus_top_p: float | None = None, nucleus_rule: str = "inclusive",
    nucleus_top_k: int = 1024, chunk_size: int | None = None,
) -> TokenStats:
    """Log-probs of `targets`, entropy and top-p nucleus entropy of softmax(logits / T).

    `logits` [..., V_loc] is this rank's vocab shard (rank r of `tp_group` holds global ids
    [r * V_loc, (r + 1) * V_loc)); `targets` [...] are global ids. Ids >= `real_vocab_size`
    (the unpadded vocab) get no probability; a target outside [0, real_vocab_size) gets
    log-prob -inf. Each row needs at least one finite real logit. Inputs are never modified.
    Every rank of `tp_group` must call this with the same token shape and options.
    `chunk_size` tokens are processed at a time (extra memory about 1.125 x chunk x V_loc x 4
    bytes); None: `default_chunk_size`.
    """
    if not (torch.is_tensor(logits) and logits.dtype in _FLOAT_DTYPES and logits.dim() >= 1):
        raise ValueError(f"logits must be a float32/bfloat16/float16 tensor [..., V_loc], got "
                         f"{getattr(logits, 'dtype', type(logits))}")
    if log_probs and (targets is None or targets.shape != logits.shape[:-1]):
        raise ValueError(f"log_probs needs targets of shape {tuple(logits.shape[:-1])}, got "
                         f"{None if targets is None else tuple(targets.shape)}")
    if not temperature > 0:
        raise ValueError(f"temperature={temperature} must be > 0")
    if chunk_size is None:
        chunk_size = default_chunk_size(logits.shape[-1], logits.device)
    if chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size} must be >= 1")
    spec = None
    if nucleus_top_p is not None:
        spec = nuc.NucleusSpec(float(nucleus_top_p), nucleus_rule, int(nucleus_top_k))
    if not (log_probs or entropy or spec):
        raise ValueError("nothing requested: set log_probs, entropy or nucleus_top_p")
    shard = VocabShard.of(logits.shape[-1], tp_group, real_vocab_size)
    plan = _Plan(shard, float(temperature), int(chunk_size), log_probs, entropy, spec)
    flat_targets = targets.reshape(-1) if log_probs else None
    outs = _TokenStatsFn.apply(logits, flat_targets, plan)
    lead = logits.shape[:-1]
    return TokenStats(**{n: None if o is None else o.view(lead) for n, o in zip(_OUTPUTS, outs)})


def vocab_parallel_log_probs(logits, targets, tp_group=None, *, temperature=1.0,
                             real_vocab_size=None, chunk_size=None) -> torch.Tensor:
    """log softmax(logits / T) at the global ids `targets` (spec 1.1), float32 [...]."""
    return vocab_parallel_token_stats(
        logits, targets, tp_group=tp_group, temperature=temperature,
        real_vocab_size=real_vocab_size, chunk_size=chunk_size).log_probs


def vocab_parallel_entropy(logits, tp_group=None, *, temperature=1.0, real_vocab_size=None,
                           chunk_size=None) -> torch.Tensor:
    """Entropy of softmax(logits / T) over the whole vocab (spec 1.2), float32 [...]."""
    return vocab_parallel_token_stats(
        logits, tp_group=tp_group, temperature=temperature, real_vocab_size=real_vocab_size,
        log_probs=False, entropy=True, chunk_size=chunk_size).entropy


def vocab_parallel_nucleus_entropy(logits, top_p, tp_group=None, rule="inclusive", *,
                                   temperature=1.0, real_vocab_size=None, top_k=1024,
                                   chunk_size=None) -> torch.Tensor:
    """Entropy of softmax(logits / T) renormalised inside the top-p nucleus (spec 1.4).

    `rule`: "inclusive" (the standard nucleus: shortest prefix with mass >= p) or
    "exclusive" (SIREN's code: only tokens whose cumulative mass stays < p; may be empty,
    then 0). `top_k` candidates per rank; larger nuclei take an exact slower path.
    """
    return vocab_parallel_token_stats(
        logits, tp_group=tp_group, temperature=temperature, real_vocab_size=real_vocab_size,
        log_probs=False, nucleus_top_p=top_p, nucleus_rule=rule, nucleus_top_k=top_k,
        chunk_size=chunk_size).nucleus_entropy


class _TokenStatsFn(torch.autograd.Function):
    """Saves the input and per-token scalars only; backward recomputes chunk by chunk."""

    @staticmethod
    def forward(ctx, logits, targets, plan: _Plan):
        ctx.set_materialize_grads(False)
        x = logits.reshape(-1, plan.shard.vocab_local)
        state = _forward(x, targets, plan)
        # outputs leave the state (never keep an output on ctx: that is a reference cycle)
        outs = tuple(state.pop(name, None) for name in _OUTPUTS)
        ctx.plan, ctx.state = plan, state
        ctx.save_for_backward(logits, targets)
        ctx.mark_non_differentiable(*(o for o in outs[3:] if o is not None))
        return outs

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_lp, g_h, g_hp, _g_mass, _g_size):
        logits, targets = ctx.saved_tensors
        if g_lp is None and g_h is None and g_hp is None:
            return None, None, None
        x = logits.reshape(-1, ctx.plan.shard.vocab_local)
        grad = _backward(x, targets, ctx.plan, ctx.state, g_lp, g_h, g_hp)
        return grad.view_as(logits), None, None


def _targets_local(targets: torch.Tensor, shard: VocabShard):
    local = targets - shard.start
    owned = (local >= 0) & (local < shard.real_local)
    return torch.where(owned, local, 0), owned


def _forward(x_TV: torch.Tensor, targets, plan: _Plan) -> dict:
    """Per-token outputs and what backward needs, as a dict of [T] tensors."""
    shard, dev = plan.shard, x_TV.device
    num_rows, n_real = x_TV.shape[0], shard.real_local
    x = x_TV[:, :n_real]
    if n_real:
        row_max = x.amax(-1).float()
    else:
        row_max = torch.full((num_rows,), float("-inf"), device=dev)
    if num_rows == 0:
        return _empty_outputs(plan, dev)
    shard.all_reduce_max(row_max)

    want_u = plan.entropy
    sums = torch.zeros(num_rows, dtype=torch.int64, device=dev)
    u = torch.zeros(num_rows, dtype=torch.int64, device=dev) if want_u else None
    bad = torch.zeros(num_rows, dtype=torch.bool, device=dev) if want_u else None
    z_target = torch.zeros(num_rows, dtype=torch.float64, device=dev)
    if plan.log_probs:
        local, owned = _targets_local(targets, shard)
    chunk = min(plan.chunk_size, num_rows)
    if n_real:
        buf = torch.empty(chunk, n_real, dtype=torch.float32, device=dev)
        tmp = torch.empty(min(plan.sub_rows, chunk), n_real, dtype=torch.float32, device=dev)
        for sl in sm.row_blocks(num_rows, chunk):
            y = sm.shift_into(x[sl], row_max[sl], plan.temperature, buf[: sl.stop - sl.start])
            if plan.log_probs:
                z_target[sl] = sm.target_values(y, local[sl], owned[sl])
            sm.chunk_sums(y, tmp, sums[sl], None if u is None else u[sl],
                          None if bad is None else bad[sl], bits=plan.bits, block=plan.block)
        del buf, tmp
    if want_u:
        _fix_neg_inf(x, row_max, u, bad, plan)
    # int64 sums travel as two exact float64 halves, so that one float64 SUM carries all
    stacked = [z_target] if plan.log_probs else []
    for exact in (sums,) if u is None else (sums, u):
        stacked += [(exact >> 31).double(), (exact & ((1 << 31) - 1)).double()]
    totals = shard.all_reduce_sum(torch.stack(stacked, dim=1)).unbind(1)
    return _finish_forward(x, targets, row_max, totals, bad, plan)


def _fix_neg_inf(x, row_max, u, bad, plan: _Plan) -> None:
    """Recompute sum e * y on the rows that met 0 * -inf (flagged in `bad`)."""
    rows = bad.nonzero().squeeze(1)
    if rows.numel():
        y = sm.shift_into(x[rows], row_max[rows], plan.temperature,
                          torch.empty(rows.numel(), x.shape[1], device=x.device))
        u[rows] = sm.fixed_sum_e_y_clamped(y, plan.bits, plan.block)


def _finish_forward(x, targets, row_max, totals, clamp, plan: _Plan) -> dict:
    it = iter(totals)
    z_target = next(it) if plan.log_probs else None
    exact = [(next(it).long() << 31) + next(it).long() for _ in range(1 + plan.entropy)]
    sum_fixed, unit = exact[0], 2.0 ** -plan.bits
    total = sum_fixed.double() * unit
    log_s = torch.log(total)
    out = {"row_max": row_max, "log_s": log_s.float(), "clamp": clamp}
    if plan.log_probs:
        valid = (targets >= 0) & (targets < plan.shard.real_vocab)
        out["log_probs"] = torch.where(valid, z_target - log_s, float("-inf")).float()
    if plan.entropy:
        out["entropy"] = (log_s - exact[1].double() * unit / total).float()
        out["h"] = out["entropy"].clone()
    if plan.nucleus:
        budget = plan.chunk_size * plan.shard.vocab_local * 4
        n = nuc.select(x, row_max, sum_fixed, plan.shard, plan.nucleus,
                       temperature=plan.temperature, bits=plan.bits, budget_bytes=budget)
        out.update(nucleus_entropy=n.entropy, nucleus_mass=n.mass, nucleus_size=n.size,
                   hp=n.entropy.clone(), hp_nonempty=n.size > 0, hp_log_mass=n.log_mass,
                   cut_value=n.cut_value, cut_id=n.cut_id, split=n.split, dense=n.dense,
                   member_rows=n.member_rows, member_ids=n.member_ids)
    return out


def _empty_outputs(plan: _Plan, dev) -> dict:
    empty = torch.empty(0, dtype=torch.float32, device=dev)
    out = {}
    if plan.log_probs:
        out["log_probs"] = empty
    if plan.entropy:
        out["entropy"] = empty.clone()
    if plan.nucleus:
        out.update(nucleus_entropy=empty.clone(), nucleus_mass=empty.clone(),
                   nucleus_size=empty.clone())
    return out


def _backward(x_TV, targets, plan: _Plan, saved: dict, g_lp, g_h, g_hp) -> torch.Tensor:
    """Gradient w.r.t. the logits shard, recomputed chunk by chunk, no communication."""
    shard, num_rows, n_real = plan.shard, x_TV.shape[0], plan.shard.real_local
    grad = torch.empty_like(x_TV)
    if n_real < shard.vocab_local:
        grad[:, n_real:] = 0
    if num_rows == 0 or n_real == 0:
        return grad.zero_()
    coef, nucleus = _coefficients(saved, plan, targets, g_lp, g_h, g_hp)
    x = x_TV[:, :n_real]
    chunk = min(plan.chunk_size, num_rows)
    if not coef.pop("active"):
        # only the nucleus entropy has a gradient: zero outside N, so no dense pass at all
        grad[:, :n_real] = 0
        for sl in sm.row_blocks(num_rows, chunk):
            nucleus.apply(grad[sl, :n_real], nucleus.terms(x[sl], sl.start))
        return grad
    buf = torch.empty(chunk, n_real, dtype=torch.float32, device=x.device)
    clamp_rows = coef.pop("clamp_rows", [])
    for sl in sm.row_blocks(num_rows, chunk):
        y = sm.shift_into(x[sl], saved["row_max"][sl], plan.temperature, buf[: sl.stop - sl.start])
        chunk_coef = {k: (v[sl] if torch.is_tensor(v) else v) for k, v in coef.items()}
        if "target" in coef:
            chunk_coef["target"] = tuple(t[sl] for t in coef["target"])
        chunk_coef["clamp_rows"] = [r - sl.start for r in clamp_rows if sl.start <= r < sl.stop]
        sm.chunk_grad(y, grad[sl, :n_real], chunk_coef, nucleus, row0=sl.start,
                      sub_rows=plan.sub_rows, x_CV=x[sl])
    return grad


def _coefficients(saved: dict, plan: _Plan, targets, g_lp, g_h, g_hp):
    """chunk_grad's per-row coefficients (p * (a1 + b1 y') + one-hot) and the nucleus term."""
    inv_t = 1.0 / plan.temperature
    log_s = saved["log_s"]
    a1 = torch.zeros_like(log_s)
    coef = {"log_s": log_s, "a1": a1, "active": g_lp is not None or g_h is not None}
    if g_lp is not None:
        # a target without probability has the constant log-prob -inf: no gradient
        valid = (targets >= 0) & (targets < plan.shard.real_vocab)
        g_lp = torch.where(valid, g_lp.reshape(-1).float(), 0.0)
        a1.sub_(g_lp * inv_t)
        local, owned = _targets_local(targets, plan.shard)
        coef["target"] = (local, torch.where(owned, g_lp * inv_t, 0.0))
    if g_h is not None:
        g_h = g_h.reshape(-1).float()
        a1.sub_(g_h * saved["h"] * inv_t)
        coef["b1"] = -g_h * inv_t
        coef["clamp_rows"] = saved["clamp"].nonzero().squeeze(1).tolist()
    nucleus = None
    if g_hp is not None:
        g_hp = g_hp.reshape(-1).float()
        nonempty = saved["hp_nonempty"]
        log_mass = torch.where(nonempty, saved["hp_log_mass"], log_s)
        rho = torch.where(nonempty, torch.exp(log_s - log_mass), 0.0)  # S / S_N
        b2 = -rho * g_hp * inv_t
        nucleus = NucleusGrad(b2 * (log_s - log_mass + saved["hp"]), b2, saved, plan.shard,
                              plan.temperature)
    return coef, nucleus
