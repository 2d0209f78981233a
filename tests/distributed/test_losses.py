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
