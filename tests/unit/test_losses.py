"""The policy surrogate, its aggregation over an optimizer step, and the KL penalty, checked
against float64 loops of spec section 2 (values and gradients)."""

from __future__ import annotations

import math

import pytest
import torch

from megarl.config import AlgorithmConfig, EntropyConfig, RolloutConfig
from megarl.losses import (
    Aggregator, ClippedSurrogate, Metrics, StepNormalizers, build_loss, kl_estimate,
    segment_quantile, segment_sum,
)
from tests.unit.test_losses_reference import (
    make_tokens, micro_batch, ref_k, ref_surrogate, ref_weights, run_step,
    scatter_grads, select, valid,
)

MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")
MAX_LEN = 12


def objective(mode="token-mean", intervention="none", entropy=None, **algo):
    return build_loss(AlgorithmConfig(loss_agg_mode=mode, **algo),
                      EntropyConfig(intervention=intervention, **(entropy or {})),
                      RolloutConfig(max_new_tokens=MAX_LEN), seed=3)


@pytest.mark.parametrize("eps_low,eps_high,c,clip", [
    (0.2, 0.2, None, True), (0.2, 0.28, 3.0, True), (1.0, 1.0, 1.2, True), (0.2, 0.2, 3.0, False),
])
def test_surrogate_token_losses_clip_flags_and_gradient(eps_low, eps_high, c, clip):
    tokens = make_tokens(1, [6, 5, 7, 4], advantages=[2.0, -1.5, 0.7, -0.4])
    lp = tokens.lp.clone().requires_grad_()
    out = ClippedSurrogate(eps_low=eps_low, eps_high=eps_high, dual_clip_c=c, clip=clip)(
        lp, tokens.old, tokens.adv, tokens.mask)
    out.token_loss.sum().backward()
    lp64 = tokens.lp.double().requires_grad_()
    ref, cuts = 0.0, []
    for t in valid(tokens):
        loss_t, cut = ref_surrogate(lp64[t], float(tokens.old[t]), float(tokens.adv[t]),
                                    eps_low, eps_high, c, clip)
        assert math.isclose(float(out.token_loss[t].detach()), float(loss_t.detach()),
                            rel_tol=1e-5, abs_tol=1e-6)
        ref = ref + loss_t
        cuts.append(cut)
    ref.backward()
    assert out.clipped[tokens.mask].tolist() == cuts
    assert any(cuts) == clip  # the batch exercises the clips
    assert not out.clipped[~tokens.mask].any() and (out.token_loss[~tokens.mask] == 0).all()
    torch.testing.assert_close(lp.grad.double(), lp64.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", MODES)
def test_each_aggregation_mode_on_a_packed_row(mode):
    tokens = make_tokens(2, [6, 3, 8])
    obj = objective(mode, clip_eps_high=0.28)
    loss, metrics, (stats,) = run_step(obj, [tokens])
    n_tok, n_seq = float(tokens.mask.sum()), float(tokens.num_seqs)
    weights = ref_weights(tokens, mode, n_tok, n_seq, MAX_LEN)
    lp64 = tokens.lp.double().requires_grad_()
    ref = sum(weights[t] * ref_surrogate(lp64[t], float(tokens.old[t]), float(tokens.adv[t]),
                                         0.2, 0.28, 3.0)[0] for t in valid(tokens))
    ref.backward()
    assert math.isclose(loss, float(ref.detach()), rel_tol=1e-5)
    torch.testing.assert_close(stats.log_probs.grad.double(), lp64.grad, rtol=1e-5, atol=1e-7)
    assert torch.isfinite(stats.log_probs.grad).all()
    assert math.isclose(metrics.reduce()["loss/policy"], float(ref.detach()), rel_tol=1e-5)


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_kl_penalty_each_estimator(estimator):
    tokens = make_tokens(3, [5, 7])
    obj = objective("seq-mean-token-mean", kl_coef=0.1, kl_estimator=estimator)
    loss, metrics, (stats,) = run_step(obj, [tokens])
    weights = ref_weights(tokens, "seq-mean-token-mean", 0, 2.0, MAX_LEN)
    lp64 = tokens.lp.double().requires_grad_()
    ref = 0.0
    for t in valid(tokens):
        pg = ref_surrogate(lp64[t], float(tokens.old[t]), float(tokens.adv[t]), 0.2, 0.2, 3.0)[0]
        ref = ref + weights[t] * (pg + 0.1 * ref_k(lp64[t], float(tokens.ref[t]), estimator))
    ref.backward()
    assert math.isclose(loss, float(ref.detach()), rel_tol=1e-5)
    torch.testing.assert_close(stats.log_probs.grad.double(), lp64.grad, rtol=1e-5, atol=1e-7)
    kl_mean = sum(float(ref_k(lp64[t], float(tokens.ref[t]), estimator).detach()) for t in valid(tokens))
    assert math.isclose(metrics.reduce()["kl/ref"], kl_mean / len(valid(tokens)), rel_tol=1e-5)


def test_k3_is_non_negative_and_zero_at_equality():
    lp = torch.linspace(-5, 0, 11)
    assert (kl_estimate(lp, lp.flip(0), "k3") >= 0).all()
    assert kl_estimate(lp, lp, "k3").abs().max() == 0


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("intervention", ["none", "entropy_bonus", "siren", "aer"])
def test_loss_and_gradients_do_not_depend_on_the_micro_batch_split(mode, intervention):
    tokens = make_tokens(4, [6, 3, 8, 5, 4, 7], groups=[0, 0, 1, 1, 2, 2],
                         rewards=[1.0, 0.0, 1.0, 1.0, 0.0, 1.0])
    size = len(tokens.mask)
    results = []
    for split in ([[0, 1, 2, 3, 4, 5]], [[0, 1], [2, 3, 4], [5]], [[3], [0, 5, 1], [2, 4]]):
        obj = objective(mode, intervention, dict(siren_anchor=0.4, aer_alpha_init=0.003),
                        kl_coef=0.05)
        parts = [select(tokens, s) for s in split]
        loss, metrics, stats = run_step(obj, parts)
        grads = [scatter_grads(parts, stats, n, size) for n in ("log_probs", "entropy",
                                                                 "nucleus_entropy")]
        results.append((loss, metrics.reduce(), grads, obj.state_dict()))
    loss0, metrics0, grads0, state0 = results[0]
    assert any(g.abs().sum() > 0 for g in grads0[1:]) == (intervention != "none")
    for loss, metrics, grads, state in results[1:]:
        assert math.isclose(loss, loss0, rel_tol=1e-5, abs_tol=1e-7)
        for g, g0 in zip(grads, grads0):
            torch.testing.assert_close(g, g0, rtol=1e-5, atol=1e-8)
        assert state["intervention"] == pytest.approx(state0["intervention"], rel=1e-9)
        for name in metrics0:
            assert metrics[name] == pytest.approx(metrics0[name], rel=1e-5, abs=1e-8), name


def test_padding_garbage_never_reaches_loss_or_gradient():
    tokens = make_tokens(5, [4, 4])
    assert torch.isnan(tokens.old).any() and torch.isnan(tokens.adv).any()
    for intervention in ("none", "kl_cov", "clip_cov"):
        loss, _, (stats,) = run_step(objective(intervention=intervention), [tokens])
        assert math.isfinite(loss) and torch.isfinite(stats.log_probs.grad).all()
        assert (stats.log_probs.grad[~tokens.mask] == 0).all()


def test_normalizers_aggregator_and_segment_helpers():
    tokens = make_tokens(6, [3, 5])
    norm = StepNormalizers.compute([micro_batch(tokens)], None)
    assert (norm.num_tokens, norm.num_seqs) == (8.0, 2.0)
    w = Aggregator("seq-mean-token-mean", 10).token_weights(tokens.mask, tokens.seq, 2, norm)
    assert w[tokens.seq == 0][1:].tolist() == pytest.approx([1 / 6] * 3)
    sums = segment_sum(torch.ones(len(tokens.mask)), tokens.mask, tokens.seq, 2)
    assert sums.tolist() == [3.0, 5.0]
    tau = segment_quantile(tokens.H, tokens.mask, tokens.seq, 3, 0.5)
    assert math.isinf(tau[2])  # a response without tokens
    with pytest.raises(ValueError, match="aggregation mode"):
        Aggregator("sum", 10)


def test_metrics_add_exactly_and_reduce_to_means():
    a, b = Metrics(), Metrics()
    a.add("x", 3.0, 2)
    b.add("x", torch.tensor(5.0), torch.tensor(2))
    b.add_mean("y", torch.tensor([1.0, 9.0, 3.0]), torch.tensor([True, False, True]))
    values = a.update(b).reduce()
    assert values == {"x": 2.0, "y": 2.0}
