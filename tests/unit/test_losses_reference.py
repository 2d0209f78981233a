"""Hand-built batches and float64 loop references of the spec formulas, shared by the loss tests.

The references are written from `specs/entropy-methods.md` sections 2-3 with plain Python
loops over tokens (torch float64 scalars, so autograd gives the reference gradient); they
never call `megarl.losses` (only `run_step` drives it, the way the actor will). The tests at
the bottom check the references themselves against numbers worked out by hand or by numpy.
"""

from __future__ import annotations

import math
import types
from dataclasses import dataclass, replace

import numpy as np
import torch

from megarl.losses import MicroBatch

NAN = float("nan")


@dataclass
class Tokens:
    """One packed row of responses: per-token [T] and per-response [S] tensors."""

    lp: torch.Tensor        # current log-probs (float32)
    old: torch.Tensor       # behaviour log-probs (nan on masked tokens)
    ref: torch.Tensor       # reference log-probs
    adv: torch.Tensor       # per-token advantages (nan on masked tokens)
    H: torch.Tensor         # full entropy
    Hp: torch.Tensor        # nucleus entropy
    mask: torch.Tensor      # bool
    seq: torch.Tensor       # response id per token (-1 on padding)
    num_seqs: int
    group: torch.Tensor     # [S] prompt index
    reward: torch.Tensor    # [S]
    index: torch.Tensor     # [T] position of each token in the batch it was cut from


def make_tokens(seed: int, lengths, *, advantages=None, groups=None, rewards=None,
                lp_low: float = -6.0) -> Tokens:
    """Responses of the given lengths packed in one row, each preceded by a masked prompt token
    (its own id) and followed by a padding token (id -1); garbage (nan) on masked tokens."""
    g = torch.Generator().manual_seed(seed)
    num = len(lengths)
    advantages = advantages if advantages is not None else [2.0, -1.5, 0.5, -0.8, 1.1, -0.3][:num]
    ids, mask = [], []
    for s, n in enumerate(lengths):
        ids += [s] + [s] * n + [-1]
        mask += [False] + [True] * n + [False]
    T = len(ids)
    seq = torch.tensor(ids)
    mask_t = torch.tensor(mask)
    lp = lp_low + (-0.05 - lp_low) * torch.rand(T, generator=g)
    old = lp + 0.45 * torch.randn(T, generator=g)
    adv = torch.tensor([advantages[i] if i >= 0 else 0.0 for i in ids])
    return Tokens(  # the ops give -inf log-probs for padding targets
        lp=torch.where(mask_t | (seq >= 0), lp, float("-inf")).float(),
        old=torch.where(mask_t, old, NAN).float(),
        ref=torch.where(mask_t, lp + 0.3 * torch.randn(T, generator=g), NAN).float(),
        adv=torch.where(mask_t, adv, NAN).float(),
        H=torch.where(seq >= 0, 0.2 + 2.8 * torch.rand(T, generator=g), NAN).float(),
        Hp=(0.05 + 1.5 * torch.rand(T, generator=g)).float(),
        mask=mask_t, seq=seq, num_seqs=num,
        group=torch.tensor(groups if groups is not None else [s // 2 for s in range(num)]),
        reward=torch.tensor(rewards if rewards is not None else [float(s % 2) for s in range(num)]),
        index=torch.arange(T),
    )


def select(tokens: Tokens, responses) -> Tokens:
    """The listed responses (in order) as a micro-batch of their own, ids renumbered."""
    keep = torch.zeros_like(tokens.mask)
    new_ids = torch.full_like(tokens.seq, -1)
    for local, s in enumerate(responses):
        here = tokens.seq == s
        keep |= here
        new_ids[here] = local
    # keep padding of the selected responses: the token after each response
    index = torch.nonzero(keep).squeeze(1)
    index = torch.unique(torch.cat([index, (index + 1).clamp(max=len(keep) - 1)]))
    pick = lambda t: t[index]  # noqa: E731
    order = torch.tensor(list(responses))
    return replace(tokens, lp=pick(tokens.lp), old=pick(tokens.old), ref=pick(tokens.ref),
                   adv=pick(tokens.adv), H=pick(tokens.H), Hp=pick(tokens.Hp),
                   mask=pick(tokens.mask), seq=pick(new_ids), num_seqs=len(responses),
                   group=tokens.group[order], reward=tokens.reward[order],
                   index=tokens.index[index])


def run_step(objective, parts: list[Tokens], dp_group=None, iterate: bool = True):
    """One optimizer step over micro-batches `parts` as the actor drives it: returns the summed
    loss, the combined Metrics and each part's leaf stats (their .grad filled)."""
    from megarl.losses import Metrics

    batches = [micro_batch(p) for p in parts]
    if iterate:
        objective.begin_iteration(batches, dp_group)
    step = objective.begin_step(batches, dp_group)
    total, metrics, all_stats = 0.0, Metrics(), []
    for batch, part in zip(batches, parts):
        stats = leaf_stats(part)
        loss, m = objective(stats, batch, step)
        loss.backward()
        total += float(loss.detach())
        metrics.update(m)
        all_stats.append(stats)
    objective.end_step(step)
    return total, metrics, all_stats


def scatter_grads(parts: list[Tokens], all_stats, name: str, size: int) -> torch.Tensor:
    """The per-token gradients of `name` put back at their positions in the original batch."""
    out = torch.zeros(size, dtype=torch.float64)
    for part, stats in zip(parts, all_stats):
        grad = getattr(stats, name).grad
        if grad is not None:
            out[part.index] += grad.double()
    return out


def micro_batch(tokens: Tokens) -> MicroBatch:
    """The implementation's view of a Tokens (old-pass stats = current stats: on-policy)."""
    return MicroBatch(mask=tokens.mask, seq_ids=tokens.seq, num_seqs=tokens.num_seqs,
                      advantages=tokens.adv, old_log_probs=tokens.old, ref_log_probs=tokens.ref,
                      old_entropy=tokens.H.clone(), old_nucleus_entropy=tokens.Hp.clone(),
                      seq_group_ids=tokens.group, seq_rewards=tokens.reward)


def leaf_stats(tokens: Tokens) -> types.SimpleNamespace:
    """Op outputs as float32 leaves (their .grad is the loss gradient)."""
    return types.SimpleNamespace(
        log_probs=tokens.lp.clone().requires_grad_(), entropy=tokens.H.clone().requires_grad_(),
        nucleus_entropy=tokens.Hp.clone().requires_grad_(),
        nucleus_size=torch.ones_like(tokens.lp), nucleus_mass=torch.ones_like(tokens.lp))


# ------------------------------------------------------------------- float64 references


def valid(tokens: Tokens) -> list[int]:
    return [t for t in range(len(tokens.mask)) if bool(tokens.mask[t])]


def ref_surrogate(lp, old, A, eps_low, eps_high, c=None, clip=True):
    """Spec 2: one token's loss and whether its gradient is cut by a clip."""
    r = torch.exp(lp - old)
    unclipped = -A * r
    if not clip:
        return unclipped, False
    lo, hi = 1 - eps_low, 1 + eps_high
    r_clip = torch.clamp(r, lo, hi)
    loss = torch.maximum(unclipped, -A * r_clip)
    cut = bool((A < 0 and r < lo) or (A > 0 and r > hi))
    if c is not None and A < 0:
        if -A * r > -A * c:
            loss, cut = -A * c + 0 * r, True
    return loss, cut


def ref_weights(tokens: Tokens, mode: str, n_tok: float, n_seq: float, max_len: int) -> dict:
    """Spec 2 aggregation as per-token weights {t: w_t}, written as the three formulas."""
    v = valid(tokens)
    if mode == "token-mean":
        return {t: 1.0 / n_tok for t in v}
    if mode == "seq-mean-token-sum-norm":
        return {t: 1.0 / (n_seq * max_len) for t in v}
    lengths = {s: sum(1 for t in v if int(tokens.seq[t]) == s) for s in range(tokens.num_seqs)}
    return {t: 1.0 / (lengths[int(tokens.seq[t])] * n_seq) for t in v}


def ref_quantile(values: list[float], q: float) -> float:
    """Linear-interpolation quantile (numpy's default), from its definition."""
    v = sorted(values)
    pos = q * (len(v) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (pos - lo) * (v[hi] - v[lo])


def ref_siren_selected(tokens: Tokens, values, q: float, use_mask: bool = True):
    """Spec 3.4: (sum over responses of the mean of `values` over kept tokens, kept set)."""
    total, kept = 0.0, set()
    for s in range(tokens.num_seqs):
        ts = [t for t in valid(tokens) if int(tokens.seq[t]) == s]
        if not ts:
            continue
        tau = ref_quantile([float(values[t].detach()) for t in ts], q)
        ks = [t for t in ts if not use_mask or float(values[t].detach()) > tau]
        kept.update(ks)
        if ks:
            total = total + sum(values[t] for t in ks) / len(ks)
    return total, kept


def ref_covariance(tokens: Tokens) -> dict:
    """Spec 3.2: cov_t with micro-batch-local means over valid tokens."""
    v = valid(tokens)
    lp = {t: float(tokens.lp[t]) for t in v}
    A = {t: float(tokens.adv[t]) for t in v}
    mlp, mA = sum(lp.values()) / len(v), sum(A.values()) / len(v)
    return {t: (lp[t] - mlp) * (A[t] - mA) for t in v}


def ref_k(lp, other, estimator):
    d = lp - other
    return {"k1": d, "k2": 0.5 * d * d, "k3": torch.exp(-d) + d - 1}[estimator]


# ------------------------------------------------------------------- checks of the references


def test_reference_quantile_matches_numpy_linear():
    rng = np.random.default_rng(0)
    for n in (1, 2, 5, 9):
        values = rng.normal(size=n).tolist()
        for q in (0.0, 0.3, 0.8, 1.0):
            assert math.isclose(ref_quantile(values, q), float(np.quantile(values, q)),
                                rel_tol=1e-12, abs_tol=1e-12)


def test_reference_surrogate_by_hand():
    one = torch.tensor(1.0, dtype=torch.float64)
    # A > 0, ratio e^0.5 = 1.65 > 1.28: clipped at 1.28
    loss, cut = ref_surrogate(0.5 * one, 0 * one, 1.0, 0.2, 0.28)
    assert math.isclose(float(loss), -1.28) and cut
    # A < 0, ratio 4.48 > c = 3: dual clip holds the loss at -A c = 6
    loss, cut = ref_surrogate(1.5 * one, 0 * one, -2.0, 0.2, 0.2, c=3.0)
    assert math.isclose(float(loss), 6.0) and cut
    # A < 0, ratio 0.61 < 0.8: lower clip, loss -A * 0.8
    loss, cut = ref_surrogate(-0.5 * one, 0 * one, -1.0, 0.2, 0.2)
    assert math.isclose(float(loss), 0.8) and cut


def test_hand_built_batch_packs_responses_with_garbage_outside_the_mask():
    tokens = make_tokens(0, [3, 2])
    assert tokens.seq.tolist() == [0, 0, 0, 0, -1, 1, 1, 1, -1]
    assert tokens.mask.tolist() == [False, True, True, True, False, False, True, True, False]
    assert torch.isnan(tokens.old[~tokens.mask]).all() and not torch.isnan(tokens.old[tokens.mask]).any()
    part = select(tokens, [1])
    assert part.seq.tolist() == [0, 0, 0, -1] and part.num_seqs == 1
