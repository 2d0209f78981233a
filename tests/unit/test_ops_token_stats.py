"""megarl.ops on one shard (tp_group=None) against the float64 reference of test_ops_reference.

Tolerances (float32 math inside, float64 reference; logits are exactly representable in
every input dtype, so forward errors do not depend on it):
  forward values: |ours - ref| <= 2e-5 + 1e-5 |ref|
  gradients:      float32 input: <= 2e-6 + 1e-4 |ref|; bf16/fp16 input (the gradient is
                  returned in the input dtype): <= 2e-5 + 8e-3 |ref| (bf16), 2e-3 |ref| (fp16)
  nucleus size:   exact, except rows whose float64 cumulative mass is within 1e-6 of p at the
                  nucleus edge (`near_boundary`), of which at most 1 row or 2% may occur.
The multi-rank versions of these checks are in tests/distributed/test_vocab_parallel.py.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from megarl.ops import (
    vocab_parallel_entropy,
    vocab_parallel_log_probs,
    vocab_parallel_nucleus_entropy,
    vocab_parallel_token_stats,
)
from tests.unit.test_ops_reference import reference

FWD_TOL = dict(atol=2e-5, rtol=1e-5)
GRAD_TOL = {
    torch.float32: dict(atol=2e-6, rtol=1e-4),
    torch.bfloat16: dict(atol=2e-5, rtol=8e-3),
    torch.float16: dict(atol=2e-5, rtol=2e-3),
}
STATS = ("log_probs", "entropy", "nucleus_entropy")


def run_ops(logits, targets, weights=(1, 1, 1), *, top_p=0.7, rule="inclusive", **kw):
    """Forward + backward of the fused op with upstream weights per stat (None: unused)."""
    x = logits.clone().requires_grad_(True)
    stats = vocab_parallel_token_stats(x, targets, entropy=True, nucleus_top_p=top_p,
                                       nucleus_rule=rule, **kw)
    terms = [(w * getattr(stats, n)).sum() for w, n in zip(weights, STATS) if w is not None]
    if terms:
        sum(terms).backward()
    return stats, x.grad


def random_weights(shape, seed, present=(True, True, True)):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(shape, generator=g) if p else None for p in present)


def check_against_reference(logits, targets, weights, *, top_p=0.7, rule="inclusive",
                            temperature=1.0, real_vocab=None, **kw):
    stats, grad = run_ops(logits, targets, weights, top_p=top_p, rule=rule,
                          temperature=temperature, real_vocab_size=real_vocab, **kw)
    vocab = logits.shape[-1]
    ref = reference(logits.reshape(-1, vocab), targets.reshape(-1), temperature=temperature,
                    real_vocab=real_vocab, top_p=top_p, rule=rule,
                    weights=tuple(None if w is None else w.reshape(-1) for w in weights))
    assert_matches(stats, grad, ref, logits.dtype)
    return stats, grad, ref


def assert_matches(stats, grad, ref, dtype, *, max_near_boundary=0.02):
    """Compare a TokenStats (+ gradient) with reference() output."""
    ok = ~ref["near_boundary"]
    assert (~ok).sum() <= max(1, max_near_boundary * ok.numel()), "too many near-boundary rows"
    for name in ("log_probs", "entropy"):
        _close(getattr(stats, name).reshape(-1), ref[name], **FWD_TOL)
    for name in ("nucleus_entropy", "nucleus_mass"):
        _close(getattr(stats, name).reshape(-1)[ok], ref[name][ok], **FWD_TOL)
    assert torch.equal(stats.nucleus_size.reshape(-1)[ok].double(), ref["nucleus_size"][ok])
    if grad is not None:
        assert grad.dtype == dtype
        rows = ok.nonzero().squeeze(1)
        _close(grad.reshape(-1, grad.shape[-1])[rows], ref["grad"][rows], **GRAD_TOL[dtype])


def _close(ours, ref, *, atol, rtol):
    ours = ours.double()
    both_inf = torch.isinf(ref) & (ours == ref)
    err = torch.where(both_inf, 0.0, (ours - ref).abs())
    bound = atol + rtol * torch.where(both_inf, 0.0, ref.abs())
    assert torch.isfinite(err).all() and (err <= bound).all(), (
        f"max excess {(err - bound).max().item():.3g} (max err {err.max().item():.3g})")


def random_case(seed, shape=(3, 5), vocab=40, scale=3.0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(*shape, vocab, generator=g) * scale).to(dtype)
    targets = torch.randint(0, vocab, shape, generator=g)
    return logits, targets


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rule", ["inclusive", "exclusive"])
@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_matches_reference(dtype, rule, temperature):
    logits, targets = random_case(1, dtype=dtype)
    targets[0, 0] = 38  # a padded id: no probability
    weights = random_weights(targets.shape, 2)
    stats, _, _ = check_against_reference(logits, targets, weights, rule=rule,
                                          temperature=temperature, real_vocab=37, chunk_size=4)
    assert stats.log_probs[0, 0] == float("-inf")
    assert stats.log_probs.dtype == stats.entropy.dtype == torch.float32


@pytest.mark.parametrize("present", [(True, False, False), (False, True, False),
                                     (False, False, True), (True, False, True),
                                     (False, True, True)])
def test_any_combination_of_upstream_gradients(present):
    logits, targets = random_case(3)
    check_against_reference(logits, targets, random_weights(targets.shape, 4, present),
                            chunk_size=2)


def edge_rows(vocab=48):
    """Rows that break naive implementations, one kind per row."""
    rows = [
        torch.zeros(vocab),                                   # uniform
        torch.cat([torch.tensor([40.0]), torch.zeros(vocab - 1)]),  # near one-hot
        torch.arange(vocab, dtype=torch.float32) % 3,         # ties everywhere
        torch.randn(vocab, generator=torch.Generator().manual_seed(5)) * 1e4,  # magnitude 1e4
        torch.where(torch.arange(vocab) % 4 == 1, float("-inf"),
                    torch.randn(vocab, generator=torch.Generator().manual_seed(6))),  # -inf
        torch.linspace(0.0, 0.1, vocab),                      # nearly flat: large nucleus
    ]
    return torch.stack(rows)


@pytest.mark.parametrize("rule", ["inclusive", "exclusive"])
@pytest.mark.parametrize("top_k", [1, 3, 1024])
def test_edge_rows_finite_and_exact(rule, top_k):
    logits = edge_rows()
    targets = torch.arange(logits.shape[0]) * 7 % logits.shape[1]
    weights = random_weights(targets.shape, 7)
    # p = 0.77 is on no multiple of 1/48 or 1/16, so uniform and tied rows have no exact edge
    stats, grad, _ = check_against_reference(logits, targets, weights, rule=rule, top_p=0.77,
                                             nucleus_top_k=top_k, chunk_size=4)
    assert torch.isfinite(grad).all()
    for name in ("entropy", "nucleus_entropy", "nucleus_mass"):
        assert torch.isfinite(getattr(stats, name)).all()


def test_empty_exclusive_nucleus_has_zero_entropy_and_gradient():
    logits = torch.tensor([[12.0, 0.0, 0.0, 1.0], [0.0, 0.0, 0.0, 0.0]])
    x = logits.clone().requires_grad_(True)
    hp = vocab_parallel_nucleus_entropy(x, 0.5, rule="exclusive")
    hp.sum().backward()
    assert hp[0] == 0 and x.grad[0].abs().max() == 0
    assert hp[1].item() == pytest.approx(math.log(1))  # 1/4 < 0.5, 2/4 is not < 0.5
    stats = vocab_parallel_token_stats(logits, log_probs=False, nucleus_top_p=0.5,
                                       nucleus_rule="exclusive")
    assert stats.nucleus_size.tolist() == [0.0, 1.0]
    assert stats.nucleus_mass[0] == 0


def test_top_p_one_keeps_every_token():
    logits, _ = random_case(14, vocab=30)
    stats = vocab_parallel_token_stats(logits, log_probs=False, entropy=True, nucleus_top_p=1.0,
                                       real_vocab_size=27, nucleus_top_k=4)
    assert (stats.nucleus_size == 27).all()
    torch.testing.assert_close(stats.nucleus_entropy, stats.entropy, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(stats.nucleus_mass, torch.ones_like(stats.nucleus_mass))
    excl = vocab_parallel_token_stats(logits, log_probs=False, nucleus_top_p=1.0,
                                      nucleus_rule="exclusive", real_vocab_size=27)
    assert (excl.nucleus_size == 26).all()


def test_empty_token_dimension():
    for shape in [(0, 16), (2, 0, 16)]:
        x = torch.randn(shape, requires_grad=True)
        targets = torch.zeros(shape[:-1], dtype=torch.long)
        stats = vocab_parallel_token_stats(x, targets, entropy=True, nucleus_top_p=0.9)
        assert stats.log_probs.shape == stats.nucleus_entropy.shape == shape[:-1]
        (stats.log_probs.sum() + stats.entropy.sum() + stats.nucleus_entropy.sum()).backward()
        assert x.grad.shape == x.shape


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_inputs_unchanged_after_forward_and_backward(dtype):
    logits, targets = random_case(8, dtype=dtype)
    logits[0, 0, 3] = float("-inf")
    before, targets_before = logits.clone(), targets.clone()
    x = logits.requires_grad_(True)
    stats = vocab_parallel_token_stats(x, targets, entropy=True, nucleus_top_p=0.8,
                                       temperature=0.9, chunk_size=3)
    (stats.log_probs.sum() + stats.entropy.sum() + stats.nucleus_entropy.sum()).backward()
    assert torch.equal(logits.detach(), before) and torch.equal(targets, targets_before)


def test_chunked_equals_unchunked_bit_for_bit():
    logits, targets = random_case(9, shape=(4, 9), vocab=64)
    weights = random_weights(targets.shape, 10)
    results = [run_ops(logits, targets, weights, chunk_size=c, nucleus_top_k=5)
               for c in (1, 3, 8, 4096)]
    for stats, grad in results[1:]:
        for name in STATS + ("nucleus_mass", "nucleus_size"):
            assert torch.equal(getattr(stats, name), getattr(results[0][0], name)), name
        assert torch.equal(grad, results[0][1])


def test_public_wrappers_agree_with_the_fused_entry_point():
    logits, targets = random_case(11)
    stats = vocab_parallel_token_stats(logits, targets, entropy=True, nucleus_top_p=0.6,
                                       nucleus_rule="exclusive", temperature=0.8)
    assert torch.equal(vocab_parallel_log_probs(logits, targets, temperature=0.8), stats.log_probs)
    assert torch.equal(vocab_parallel_entropy(logits, temperature=0.8), stats.entropy)
    hp = vocab_parallel_nucleus_entropy(logits, 0.6, None, "exclusive", temperature=0.8)
    assert torch.equal(hp, stats.nucleus_entropy)
    only_lp = vocab_parallel_token_stats(logits, targets)
    assert only_lp.entropy is None and only_lp.nucleus_size is None


@pytest.mark.parametrize("kwargs, match", [
    (dict(temperature=0.0), "temperature"),
    (dict(nucleus_top_p=1.5), "top_p"),
    (dict(nucleus_top_p=0.5, nucleus_rule="strict"), "rule"),
    (dict(nucleus_top_p=0.5, nucleus_top_k=0), "top_k"),
    (dict(real_vocab_size=41), "real_vocab_size"),
    (dict(chunk_size=0), "chunk_size"),
    (dict(log_probs=False), "nothing requested"),
])
def test_bad_arguments_name_the_field(kwargs, match):
    logits, targets = random_case(12)
    with pytest.raises(ValueError, match=match):
        vocab_parallel_token_stats(logits, targets, **kwargs)


def test_bad_inputs_are_refused():
    logits, targets = random_case(13)
    with pytest.raises(ValueError, match="targets"):
        vocab_parallel_token_stats(logits, None)
    with pytest.raises(ValueError, match="float32"):
        vocab_parallel_token_stats(logits.long(), targets)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    lead=st.lists(st.integers(0, 5), min_size=1, max_size=2),
    vocab=st.integers(1, 33),
    pad=st.integers(0, 3),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    temperature=st.sampled_from([1.0, 0.5, 1.7]),
    top_p=st.floats(0.05, 0.99),  # p = 1 is a boundary by definition: own test
    rule=st.sampled_from(["inclusive", "exclusive"]),
    top_k=st.integers(1, 8),
    chunk=st.integers(1, 7),
    seed=st.integers(0, 2**16),
)
def test_property_random_shapes_match_reference(lead, vocab, pad, dtype, temperature, top_p,
                                                rule, top_k, chunk, seed):
    real = max(1, vocab - pad)
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(*lead, vocab, generator=g) * 4).to(dtype)
    targets = torch.randint(0, real, tuple(lead), generator=g)
    weights = random_weights(tuple(lead), seed + 1)
    stats, grad = run_ops(logits, targets, weights, top_p=top_p, rule=rule,
                          temperature=temperature, real_vocab_size=real, nucleus_top_k=top_k,
                          chunk_size=chunk)
    ref = reference(logits.reshape(-1, vocab), targets.reshape(-1), temperature=temperature,
                    real_vocab=real, top_p=top_p, rule=rule,
                    weights=tuple(w.reshape(-1) for w in weights))
    assert_matches(stats, grad, ref, dtype)
