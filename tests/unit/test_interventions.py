"""Each entropy intervention on hand-built packed batches, against float64 loops of spec section 3:
the tokens it selects, its loss value and its gradient."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from megarl.config import AlgorithmConfig, EntropyConfig, RolloutConfig
from megarl.losses import build_loss, segment_quantile
from tests.unit.test_losses_reference import (
    make_tokens, ref_covariance, ref_quantile, ref_siren_selected, ref_surrogate,
    ref_weights, run_step, valid,
)

MAX_LEN = 10
LENGTHS = [7, 4, 9, 6]


def build(intervention, mode="seq-mean-token-mean", seed=0, algo=None, **entropy):
    return build_loss(AlgorithmConfig(loss_agg_mode=mode, **(algo or {})),
                      EntropyConfig(intervention=intervention, **entropy),
                      RolloutConfig(max_new_tokens=MAX_LEN), seed=seed)


def pg_reference(tokens, lp64, weights, eps=(0.2, 0.2), c=3.0, clip=True, drop=()):
    """sum_t w_t l_t over valid tokens not in `drop` (spec 2), and the set of clipped tokens."""
    total, cut = 0.0, set()
    for t in valid(tokens):
        loss_t, is_cut = ref_surrogate(lp64[t], float(tokens.old[t]), float(tokens.adv[t]),
                                       eps[0], eps[1], c, clip)
        if is_cut:
            cut.add(t)
        if t not in drop:
            total = total + weights[t] * loss_t
    return total, cut


def leaves(tokens):
    return (tokens.lp.double().requires_grad_(), tokens.H.double().requires_grad_(),
            tokens.Hp.double().requires_grad_())


def check(result, ref_loss, refs, names=("log_probs", "entropy", "nucleus_entropy")):
    loss, _, (stats,) = result
    ref_loss.backward()
    assert math.isclose(loss, float(ref_loss.detach()), rel_tol=1e-5, abs_tol=1e-7)
    for name, ref in zip(names, refs):
        expected = torch.zeros_like(ref) if ref.grad is None else ref.grad
        got = getattr(stats, name).grad
        got = torch.zeros_like(expected) if got is None else got.double()
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-8)


def grad_support(result, name):
    grad = getattr(result[2][0], name).grad
    return set() if grad is None else set(torch.nonzero(grad).squeeze(1).tolist())


def test_entropy_bonus():
    tokens = make_tokens(10, LENGTHS)
    result = run_step(build("entropy_bonus", entropy_coef=0.01), [tokens])
    w = ref_weights(tokens, "seq-mean-token-mean", 0, 4.0, MAX_LEN)
    lp, H, Hp = leaves(tokens)
    pg, _ = pg_reference(tokens, lp, w)
    check(result, pg - 0.01 * sum(w[t] * H[t] for t in valid(tokens)), (lp, H, Hp))
    assert result[1].reduce()["entropy_bonus/coef"] == 0.01


def test_entropy_bonus_zero_coefficient_is_off():
    tokens = make_tokens(10, LENGTHS)
    result = run_step(build("entropy_bonus", entropy_coef=0.0), [tokens])
    assert result[2][0].entropy.grad is None


def test_clip_cov_zeroes_every_candidate_when_the_budget_allows():
    tokens = make_tokens(11, LENGTHS)
    lb, ub = 0.3, 4.0
    cov = ref_covariance(tokens)
    lp, H, Hp = leaves(tokens)
    w = ref_weights(tokens, "token-mean", len(valid(tokens)), 4.0, MAX_LEN)
    _, cut = pg_reference(tokens, lp, w)
    in_range = {t for t, c in cov.items() if lb < c < ub}
    candidates = in_range - cut
    assert candidates and in_range & cut  # some in-range tokens are excluded by the PPO clip
    ratio = len(candidates) / len(valid(tokens)) + 1e-3  # n = floor(...) = every candidate
    obj = build("clip_cov", "token-mean", clip_cov_ratio=ratio, cov_lb=lb, cov_ub=ub)
    result = run_step(obj, [tokens])
    pg, _ = pg_reference(tokens, lp, w, drop=candidates)
    check(result, pg, (lp, H, Hp))
    assert not grad_support(result, "log_probs") & candidates
    metrics = result[1].reduce()
    assert metrics["clip_cov/frac_clipped"] == pytest.approx(len(candidates) / len(valid(tokens)))
    covs = [cov[t] for t in valid(tokens)]
    assert metrics["cov/mean"] == pytest.approx(np.mean(covs), rel=1e-5)
    assert metrics["cov/p90"] == pytest.approx(np.quantile(covs, 0.9), rel=1e-5)


def test_clip_cov_draws_n_candidates_from_a_seeded_stream():
    tokens = make_tokens(12, [30, 25, 28, 31])
    lb, ub, ratio = -10.0, 10.0, 0.05
    n = max(1, math.floor(ratio * len(valid(tokens))))
    picks = {}
    for seed in (0, 0, 1):
        obj = build("clip_cov", "token-mean", seed=seed, clip_cov_ratio=ratio, cov_lb=lb, cov_ub=ub)
        chosen = []
        for _ in range(2):
            result = run_step(obj, [tokens])
            lp, _, _ = leaves(tokens)
            w = ref_weights(tokens, "token-mean", len(valid(tokens)), 4.0, MAX_LEN)
            _, cut = pg_reference(tokens, lp, w)
            zeroed = set(valid(tokens)) - grad_support(result, "log_probs") - cut
            zeroed -= {t for t in valid(tokens) if float(tokens.adv[t]) == 0}
            assert len(zeroed) == n
            chosen.append(zeroed)
        picks.setdefault(seed, []).append(chosen)
    assert picks[0][0] == picks[0][1]  # same seed, same draws
    assert picks[0][0][0] != picks[0][0][1]  # the stream moves on between micro-batches
    assert picks[1][0] != picks[0][0]


def test_kl_cov_penalises_the_top_k_covariance_tokens_of_the_unclipped_surrogate():
    tokens = make_tokens(13, LENGTHS)
    cov = ref_covariance(tokens)
    n_valid = len(valid(tokens))
    ratio, coef = 0.15, 0.7
    k = max(1, math.floor(ratio * n_valid))
    top = set(sorted(cov, key=cov.get, reverse=True)[:k])
    result = run_step(build("kl_cov", kl_cov_ratio=ratio, kl_cov_coef=coef), [tokens])
    lp, H, Hp = leaves(tokens)
    w = ref_weights(tokens, "seq-mean-token-mean", 0, 4.0, MAX_LEN)
    pg, _ = pg_reference(tokens, lp, w, clip=False)
    penalty = sum(w[t] * coef * torch.abs(lp[t] - float(tokens.old[t])) for t in top)
    check(result, pg + penalty, (lp, H, Hp))
    metrics = result[1].reduce()
    assert metrics["kl_cov/frac_penalised"] == pytest.approx(k / n_valid)
    assert metrics["ppo/clip_frac_low"] == metrics["ppo/clip_frac_high"] == 0


def siren_reference(tokens, values64, lp64, anchor, lam, q=0.8, use_mask=True, use_anchor=True,
                    mode="seq-mean-token-mean"):
    w = ref_weights(tokens, mode, len(valid(tokens)), tokens.num_seqs, MAX_LEN)
    pg, _ = pg_reference(tokens, lp64, w)
    selected, kept = ref_siren_selected(tokens, values64, q, use_mask)
    h_sel = selected / tokens.num_seqs
    reg = lam * (h_sel - anchor) ** 2 if use_anchor else -lam * h_sel
    return pg + reg, kept, float(torch.as_tensor(h_sel).detach())


@pytest.mark.parametrize("variant", [
    dict(), dict(siren_use_anchor=False), dict(siren_use_nucleus=False),
    dict(siren_use_mask=False), dict(siren_mask_quantile=0.5, siren_coef=0.05),
])
def test_siren_selected_tokens_value_and_exact_gradient(variant):
    tokens = make_tokens(14, LENGTHS)
    settings = dict(siren_anchor=0.3, **variant)
    result = run_step(build("siren", **settings), [tokens])
    lp, H, Hp = leaves(tokens)
    use_nucleus = settings.get("siren_use_nucleus", True)
    values = Hp if use_nucleus else H
    ref, kept, h_sel = siren_reference(
        tokens, values, lp, 0.3, settings.get("siren_coef", 0.005),
        q=settings.get("siren_mask_quantile", 0.8), use_mask=settings.get("siren_use_mask", True),
        use_anchor=settings.get("siren_use_anchor", True))
    check(result, ref, (lp, H, Hp))
    assert grad_support(result, "nucleus_entropy" if use_nucleus else "entropy") == kept
    metrics = result[1].reduce()
    assert metrics["siren/selected_entropy"] == pytest.approx(h_sel, rel=1e-6)
    assert metrics["siren/kept_frac"] == pytest.approx(len(kept) / len(valid(tokens)))


def test_siren_anchor_is_measured_on_the_first_batch_and_then_fixed():
    first, second = make_tokens(15, LENGTHS), make_tokens(16, [5, 8, 6, 7])
    obj = build("siren")
    result = run_step(obj, [first])
    _, _, Hp = leaves(first)
    _, _, h0 = siren_reference(first, Hp, Hp, 0.0, 0.005)
    assert obj.intervention.anchor == pytest.approx(float(h0), rel=1e-6)
    assert not grad_support(result, "nucleus_entropy")  # H_sel = anchor on the first step
    result = run_step(obj, [second])
    lp, H, Hp = leaves(second)
    ref, _, _ = siren_reference(second, Hp, lp, float(h0), 0.005)
    check(result, ref, (lp, H, Hp))
    assert result[1].reduce()["siren/anchor"] == pytest.approx(float(h0), rel=1e-6)


def test_siren_quantile_is_per_response_in_a_packed_row():
    tokens = make_tokens(17, [1, 2, 5, 9, 4])
    tau = segment_quantile(tokens.Hp, tokens.mask, tokens.seq, tokens.num_seqs, 0.8)
    for s in range(tokens.num_seqs):
        values = [float(tokens.Hp[t]) for t in valid(tokens) if int(tokens.seq[t]) == s]
        assert float(tau[s]) == pytest.approx(float(np.quantile(values, 0.8)), rel=1e-12)
        assert float(tau[s]) == pytest.approx(ref_quantile(values, 0.8), rel=1e-12)
    siren = build("siren").intervention
    kept = siren.kept_tokens(tokens.Hp, tokens.mask, tokens.seq, tokens.num_seqs)
    assert set(torch.nonzero(kept).squeeze(1).tolist()) == ref_siren_selected(tokens, tokens.Hp, 0.8)[1]
    # a response of one token keeps nothing (nothing is above its own quantile)
    assert not kept[tokens.seq == 0].any()


def aer_weights(tokens, difficulty=True, skip_uniform=True):
    """Spec 3.5 per response, by loops: w_q = 1 - acc_q (or 1), uniform groups 0, mean 1."""
    groups = sorted(set(tokens.group.tolist()))
    raw = {}
    for g in groups:
        rewards = [float(r) for r, gg in zip(tokens.reward, tokens.group) if int(gg) == g]
        if skip_uniform and max(rewards) == min(rewards):
            continue
        raw[g] = 1 - sum(r > 0 for r in rewards) / len(rewards) if difficulty else 1.0
    mean = sum(raw.values()) / len(raw)
    return [raw.get(int(g), 0.0) / mean for g in tokens.group]


@pytest.mark.parametrize("weighting,skip", [("difficulty", True), ("uniform", True),
                                            ("difficulty", False)])
def test_aer_weighted_bonus_and_coefficient_updates(weighting, skip):
    tokens = make_tokens(18, [5, 6, 4, 7, 3, 6], groups=[0, 0, 0, 1, 1, 2],
                         rewards=[1.0, 0.0, 0.0, 1.0, 1.0, 1.0])
    settings = dict(aer_alpha_init=0.004, aer_lr=0.01, aer_target_ratio=0.4,
                    aer_weighting=weighting, aer_skip_uniform_groups=skip)
    obj = build("aer", "token-mean", **settings)
    result = run_step(obj, [tokens])
    lp, H, Hp = leaves(tokens)
    w = ref_weights(tokens, "token-mean", len(valid(tokens)), 6.0, MAX_LEN)
    per_seq = aer_weights(tokens, weighting == "difficulty", skip)
    pg, _ = pg_reference(tokens, lp, w)
    bonus = sum(w[t] * per_seq[int(tokens.seq[t])] * H[t] for t in valid(tokens))
    check(result, pg - 0.004 * bonus, (lp, H, Hp))
    h0 = float(np.mean([float(tokens.H[t]) for t in valid(tokens)]))
    alpha = min(max(0.004 + 0.01 * (0.4 * h0 - h0), 0.0), 1e-2)
    assert obj.intervention.initial_entropy == pytest.approx(h0, rel=1e-9)
    assert obj.intervention.alpha == pytest.approx(alpha, rel=1e-9)
    low = make_tokens(19, [5, 6, 4, 7, 3, 6], groups=[0, 0, 0, 1, 1, 2])
    low.H = low.H * 0.1  # entropy collapsed below the target: alpha grows
    run_step(obj, [low])
    h1 = float(np.mean([float(low.H[t]) for t in valid(low)]))
    alpha = min(max(alpha + 0.01 * (0.4 * h0 - h1), 0.0), 1e-2)
    assert obj.intervention.alpha == pytest.approx(alpha, rel=1e-9) and alpha > 0
    assert result[1].reduce()["aer/alpha"] == 0.004
