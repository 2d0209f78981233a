"""An independent float64 single-process reference for the vocab-parallel ops, from the spec.

Written from `specs/entropy-methods.md` section 1 without calling megarl: float64 softmax of
the whole (unsharded) vocab, a sort-based nucleus with the explicit tie rule (probability
descending, then smaller id), and gradients from float64 autograd. The tests in this file
check the reference itself on cases with known answers.

Shape legend: T tokens, V padded vocab.
"""

from __future__ import annotations

import math

import numpy as np
import torch

NEAR_BOUNDARY = 1e-6
"""Rows whose cumulative mass lies within this of p at the nucleus edge are `near_boundary`:
float32 masses (relative error about 1e-7) may legitimately decide them differently."""


def reference(logits_TV: torch.Tensor, targets_T: torch.Tensor | None = None, *,
              temperature: float = 1.0, real_vocab: int | None = None,
              top_p: float | None = None, rule: str = "inclusive",
              weights: tuple | None = None) -> dict:
    """Float64 log-probs, entropy, nucleus entropy/mass/size and, given upstream `weights`
    (w_lp, w_h, w_hp; each [T] or None), the gradient of sum(w * stat) w.r.t. the logits."""
    num_rows, vocab = logits_TV.shape
    real = vocab if real_vocab is None else real_vocab
    x = logits_TV.detach().to(torch.float64).clone().requires_grad_(True)
    padded = torch.arange(vocab) >= real
    z = (x / temperature).masked_fill(padded, float("-inf"))
    logp = torch.log_softmax(z, dim=-1)
    p = logp.exp()
    out = {"entropy": -(p * torch.where(torch.isfinite(logp), logp, 0.0)).sum(-1)}
    if targets_T is not None:
        valid = (targets_T >= 0) & (targets_T < real)
        picked = logp.gather(1, targets_T.clamp(0, vocab - 1).unsqueeze(1)).squeeze(1)
        out["log_probs"] = torch.where(valid, picked, float("-inf"))
    if top_p is not None:
        member, margin = _nucleus_members(x.detach() , p.detach(), real, top_p, rule)
        out.update(_nucleus_entropy(z, p, member))
        out["near_boundary"] = margin < NEAR_BOUNDARY
    if weights is not None:
        loss = sum((w.double() * out[name]).sum() for w, name in
                   zip(weights, ("log_probs", "entropy", "nucleus_entropy")) if w is not None)
        loss.backward()
        out["grad"] = x.grad
    return {k: v.detach() for k, v in out.items()}


def _nucleus_members(x_TV, p_TV, real: int, top_p: float, rule: str):
    member = torch.zeros_like(p_TV, dtype=torch.bool)
    margin = np.full(x_TV.shape[0], np.inf)
    ids = np.arange(real)
    for r in range(x_TV.shape[0]):
        values = x_TV[r, :real].numpy()
        order = np.lexsort((ids, -values))  # value descending, then id ascending
        cum = np.cumsum(p_TV[r, :real].numpy()[order])
        below = int(np.searchsorted(cum, top_p, side="left"))  # tokens with cum < p
        size = below if rule == "exclusive" else min(below + 1, real)
        member[r, torch.from_numpy(order[:size])] = True
        edges = [cum[i] for i in (below - 1, below) if 0 <= i < real]
        margin[r] = min(abs(c - top_p) for c in edges)
    return member, torch.from_numpy(margin)


def _nucleus_entropy(z_TV, p_TV, member_TV) -> dict:
    nonempty = member_TV.any(-1)
    # an empty nucleus (exclusive rule) has H_p = 0; a dummy member keeps its row NaN-free
    safe = member_TV | ~nonempty.unsqueeze(1) & (torch.arange(z_TV.shape[1]) == 0)
    logq = torch.log_softmax(z_TV.masked_fill(~safe, float("-inf")), dim=-1)
    h = -(logq.exp() * torch.where(safe, logq, 0.0)).sum(-1)
    return {
        "nucleus_entropy": torch.where(nonempty, h, 0.0),
        "nucleus_mass": torch.where(member_TV, p_TV, 0.0).sum(-1),
        "nucleus_size": member_TV.sum(-1).double(),
    }


# ------------------------------------------------------------------------------------------
# The reference on cases with known answers.


def test_uniform_rows_have_log_v_entropy_and_exact_nucleus_sizes():
    out = reference(torch.zeros(2, 8), torch.tensor([0, 7]), top_p=0.55, rule="inclusive")
    assert torch.allclose(out["entropy"], torch.full((2,), math.log(8), dtype=torch.float64))
    assert torch.allclose(out["log_probs"], torch.full((2,), -math.log(8), dtype=torch.float64))
    assert out["nucleus_size"].tolist() == [5.0, 5.0]  # 4/8 < 0.55 <= 5/8
    log5 = torch.full((2,), math.log(5), dtype=torch.float64)
    assert torch.allclose(out["nucleus_entropy"], log5)
    excl = reference(torch.zeros(1, 8), top_p=0.55, rule="exclusive")
    assert excl["nucleus_size"].tolist() == [4.0]


def test_ties_go_to_the_smaller_id_and_padding_gets_nothing():
    logits = torch.tensor([[0.0, 1.0, 1.0, 1.0, 5.0]])
    out = reference(logits, top_p=0.001, real_vocab=4)  # id 4 is padding
    assert out["nucleus_size"].tolist() == [1.0]
    assert out["nucleus_mass"].item() == pytest_approx(math.e / (1 + 3 * math.e))
    out = reference(logits, torch.tensor([4]), real_vocab=4)
    assert out["log_probs"].item() == float("-inf")


def test_empty_exclusive_nucleus_and_its_zero_gradient():
    logits = torch.tensor([[10.0, 0.0, 0.0]])
    w = (None, None, torch.ones(1))
    out = reference(logits, top_p=0.5, rule="exclusive", weights=w)
    assert out["nucleus_size"].item() == 0 and out["nucleus_entropy"].item() == 0
    assert torch.count_nonzero(out["grad"]) == 0


def test_entropy_gradient_matches_the_spec_formula():
    logits = torch.randn(3, 6, generator=torch.Generator().manual_seed(0))
    out = reference(logits, weights=(None, torch.ones(3), None), temperature=0.5)
    z = logits.double() / 0.5
    p = torch.softmax(z, -1)
    q = (p * z).sum(-1, keepdim=True)
    assert torch.allclose(out["grad"], -p * (z - q) / 0.5)


def pytest_approx(value):
    import pytest

    return pytest.approx(value, rel=1e-12)
