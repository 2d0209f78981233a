"""The losses across processes: data-parallel invariance of the global aggregation (and of the
interventions' state), the DP-global covariance scope, and tensor-parallel invariance of loss
and logits gradient through the vocab-parallel ops (Clip-Cov's random choice included)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist

from megarl.config import AlgorithmConfig, EntropyConfig, RolloutConfig
from megarl.losses import build_loss
from tests.harness import run_distributed
from tests.unit.test_losses_reference import make_tokens, run_step, scatter_grads, select

DP_CASES = [
    ("token-mean", "none", {}), ("seq-mean-token-mean", "entropy_bonus", {"entropy_coef": 0.01}),
    ("seq-mean-token-sum-norm", "siren", {}), ("token-mean", "siren", {"siren_use_anchor": False}),
    ("seq-mean-token-mean", "aer", {"aer_alpha_init": 0.005, "aer_lr": 0.002}),
]
# rank -> micro-batches (lists of response indices of the global batch)
DP2_SPLITS = [[[0], [1, 2]], [[3, 4, 5]]]
DP2_OTHER_SPLITS = [[[2, 0, 1]], [[5], [3], [4]]]


def _objective(mode, intervention, settings):
    return build_loss(AlgorithmConfig(loss_agg_mode=mode, kl_coef=0.05),
                      EntropyConfig(intervention=intervention, **settings),
                      RolloutConfig(max_new_tokens=16), seed=7)


def _batches():
    kwargs = dict(groups=[0, 0, 1, 1, 2, 2], rewards=[1.0, 0.0, 1.0, 0.0, 0.0, 0.0])
    first = make_tokens(40, [6, 3, 8, 5, 4, 7], **kwargs)
    second = make_tokens(41, [5, 9, 2, 6, 7, 3], **kwargs)
    second.H, second.Hp = second.H * 0.3, second.Hp * 0.5  # off the anchor, below AER's target
    return first, second


def _two_steps(case, splits, dp_group):
    """Two training steps (anchors and H_0 measured on the first); the second's results."""
    obj = _objective(*case)
    out = None
    for tokens in _batches():
        parts = [select(tokens, s) for s in splits]
        loss, metrics, stats = run_step(obj, parts, dp_group)
        size = len(tokens.mask)
        grads = torch.stack([scatter_grads(parts, stats, n, size)
                             for n in ("log_probs", "entropy", "nucleus_entropy")])
        out = (loss, grads, metrics.reduce(dp_group), obj.state_dict()["intervention"])
    return out


def _dp_invariance():
    rank = dist.get_rank()
    dp = dist.new_group([0, 1])
    results = []
    for case in DP_CASES:
        single = _two_steps(case, [[0, 1, 2, 3, 4, 5]], None)
        split_a = _two_steps(case, DP2_SPLITS[rank], dp)
        split_b = _two_steps(case, DP2_OTHER_SPLITS[rank], dp)
        results.append((single, split_a, split_b))
    return results


def test_global_aggregation_and_state_do_not_depend_on_dp_or_micro_batch_size():
    per_rank = run_distributed(_dp_invariance, world_size=2, timeout=120)
    for index, case in enumerate(DP_CASES):
        (single, _, _), (single1, _, _) = per_rank[0][index], per_rank[1][index]
        assert single[0] == single1[0]
        for which in (1, 2):
            halves = [per_rank[r][index][which] for r in (0, 1)]
            loss = halves[0][0] + halves[1][0]
            assert math.isclose(loss, single[0], rel_tol=1e-5, abs_tol=1e-7), case
            torch.testing.assert_close(halves[0][1] + halves[1][1], single[1], rtol=1e-5,
                                       atol=1e-8)
            assert halves[0][2] == halves[1][2], "metrics differ between DP ranks"
            assert halves[0][3] == halves[1][3], "state differs between DP ranks"
            assert halves[0][3].keys() == single[3].keys()
            for key, value in single[3].items():
                assert halves[0][3][key] == (value if value is None
                                             else pytest.approx(value, rel=1e-9)), (case, key)
            for name, value in single[2].items():
                assert halves[0][2][name] == pytest.approx(value, rel=1e-5, abs=1e-8), name
        if case[1] != "none":  # the intervention acted on the second step
            assert single[1][1:].abs().sum() > 0


def _covariance_scopes():
    rank = dist.get_rank()
    dp = dist.new_group([0, 1])
    tokens = make_tokens(42, [6, 3, 8, 5], advantages=[2.0, -1.0, 0.5, -2.0])
    mine = select(tokens, [[0, 1], [2, 3]][rank])
    out = {}
    for scope in ("local", "global"):
        obj = build_loss(AlgorithmConfig(), EntropyConfig(intervention="kl_cov", cov_scope=scope,
                                                          kl_cov_ratio=0.1),
                         RolloutConfig(max_new_tokens=16), seed=1)
        out[scope] = run_step(obj, [mine], dp)[1].pair("cov/mean")
    single = build_loss(AlgorithmConfig(), EntropyConfig(intervention="kl_cov"),
                        RolloutConfig(max_new_tokens=16), seed=1)
    out["single"] = run_step(single, [tokens], None)[1].pair("cov/mean")
    return out


def test_global_covariance_scope_takes_means_over_the_dp_group():
    per_rank = run_distributed(_covariance_scopes, world_size=2, timeout=60)
    single_sum, single_count = per_rank[0]["single"]
    for scope, expect_equal in (("global", True), ("local", False)):
        total = sum(per_rank[r][scope][0] for r in (0, 1))
        count = sum(per_rank[r][scope][1] for r in (0, 1))
        assert count == single_count
        assert math.isclose(total, single_sum, rel_tol=1e-9) == expect_equal, scope


TP_CASES = [
    ("none", {}), ("entropy_bonus", {"entropy_coef": 0.05}),
    ("clip_cov", {"clip_cov_ratio": 0.1, "cov_lb": -0.5, "cov_ub": 20.0}),
    ("kl_cov", {"kl_cov_ratio": 0.1}), ("siren", {"siren_anchor": 0.2, "siren_coef": 0.5}),
    ("aer", {"aer_alpha_init": 0.01}),
]
VOCAB = 48


def _tp_case_inputs():
    """Full logits, targets and loss inputs of one packed micro-batch (same on every rank)."""
    tokens = make_tokens(50, [9, 6, 11, 7], groups=[0, 0, 1, 1], rewards=[1.0, 0.0, 1.0, 1.0])
    g = torch.Generator().manual_seed(51)
    logits = 2.5 * torch.randn(len(tokens.mask), VOCAB, generator=g)
    targets = torch.randint(0, VOCAB, (len(tokens.mask),), generator=g)
    lp = torch.log_softmax(logits.double() / 0.7, -1).gather(1, targets[:, None]).squeeze(1)
    old = torch.where(tokens.mask, lp + 0.4 * torch.randn(lp.shape, generator=g), float("nan"))
    return tokens, logits, targets, old.float()


def _tp_loss(case, tp, tp_group, shard_index):
    from megarl.losses import MicroBatch
    from megarl.ops import vocab_parallel_token_stats

    tokens, logits, targets, old = _tp_case_inputs()
    width = VOCAB // tp
    shard = logits[:, shard_index * width:(shard_index + 1) * width].clone()
    objective = build_loss(AlgorithmConfig(loss_agg_mode="seq-mean-token-mean", kl_coef=0.1),
                           EntropyConfig(intervention=case[0], **case[1]),
                           RolloutConfig(max_new_tokens=16, temperature=0.7), seed=11)
    kwargs = dict(tp_group=tp_group, **objective.stats_kwargs)
    with torch.no_grad():
        before = vocab_parallel_token_stats(shard, targets, **kwargs)
    batch = MicroBatch(mask=tokens.mask, seq_ids=tokens.seq, num_seqs=tokens.num_seqs,
                       advantages=tokens.adv, old_log_probs=old, ref_log_probs=before.log_probs,
                       old_entropy=before.entropy, old_nucleus_entropy=before.nucleus_entropy,
                       seq_group_ids=tokens.group, seq_rewards=tokens.reward)
    objective.begin_iteration([batch])
    step = objective.begin_step([batch])
    shard.requires_grad_()
    loss, metrics = objective(vocab_parallel_token_stats(shard, targets, **kwargs), batch, step)
    loss.backward()
    return float(loss), shard.grad, metrics.reduce()


def _tp_invariance():
    rank = dist.get_rank()
    groups = {1: None}
    for tp in (2, 4):
        for start in range(0, 4, tp):  # every rank creates every group, in the same order
            group = dist.new_group(list(range(start, start + tp)))
            if start <= rank < start + tp:
                groups[tp] = group
    return {(case[0], tp): _tp_loss(case, tp, groups[tp], rank % tp)
            for case in TP_CASES for tp in (1, 2, 4)}


def test_loss_and_logits_gradient_do_not_depend_on_tp_size():
    per_rank = run_distributed(_tp_invariance, world_size=4, timeout=240)
    for name, _ in TP_CASES:
        loss1, grad1, metrics1 = per_rank[0][(name, 1)]
        assert grad1.abs().sum() > 0
        for tp in (2, 4):
            losses = [per_rank[r][(name, tp)][0] for r in range(4)]
            assert max(losses) == min(losses), (name, tp)  # every rank of every TP group
            assert math.isclose(losses[0], loss1, rel_tol=1e-5, abs_tol=1e-7), (name, tp)
            grad = torch.cat([per_rank[r][(name, tp)][1] for r in range(tp)], dim=-1)
            torch.testing.assert_close(grad, grad1, rtol=1e-4, atol=1e-7, msg=f"{name} tp={tp}")
            for key, value in metrics1.items():
                assert per_rank[0][(name, tp)][2][key] == pytest.approx(value, rel=1e-4,
                                                                        abs=1e-7), (name, key)
    metrics = per_rank[0][("clip_cov", 1)][2]
    assert 0 < metrics["clip_cov/frac_clipped"] < metrics["clip_cov/frac_candidates"]
