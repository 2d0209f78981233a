"""Micro-batch planning and the padded/packed layouts line targets up with response tokens."""

from __future__ import annotations

import random

import pytest
import torch
from hypothesis import given, settings, strategies as st

from megarl.actor.experience import Sample
from megarl.actor.packing import (
    balance_over_ranks, build_packed, build_padded, plan_micro_batches,
)


def _sample(prompt_len, response_len, group=0, counts=True, seed=0):
    rng = random.Random(seed)
    return Sample(prompt_ids=[rng.randrange(3, 50) for _ in range(prompt_len)],
                  response_ids=[rng.randrange(3, 50) for _ in range(response_len)],
                  group=group, reward=0.0, counts_in_loss=counts)


@given(st.lists(st.integers(1, 200), min_size=1, max_size=40), st.integers(1, 4))
@settings(max_examples=50, deadline=None)
def test_balance_assigns_every_sample_once_and_evenly(lengths, ranks):
    samples = [_sample(1, n - 1 if n > 1 else 0, seed=i) for i, n in enumerate(lengths)]
    parts = balance_over_ranks(samples, ranks)
    assert sorted(i for p in parts for i in p) == list(range(len(samples)))
    assert all(p == sorted(p) for p in parts)   # original order kept within a rank
    loads = [sum(samples[i].num_tokens for i in p) for p in parts]
    assert max(loads) - min(loads) <= max(s.num_tokens for s in samples)
    assert parts == balance_over_ranks(samples, ranks)   # deterministic


@given(st.lists(st.integers(1, 100), min_size=1, max_size=30), st.integers(20, 300),
       st.booleans())
@settings(max_examples=60, deadline=None)
def test_micro_batches_respect_the_budget_and_order(lengths, budget, padded):
    plans = plan_micro_batches(lengths, budget, padded=padded)
    assert [i for p in plans for i in p] == list(range(len(lengths)))
    for p in plans:
        cost = max(lengths[i] for i in p) * len(p) if padded else sum(lengths[i] for i in p)
        assert cost <= budget or len(p) == 1


def test_padded_layout_aligns_targets_with_response_tokens():
    samples = [_sample(3, 4, seed=1), _sample(5, 2, seed=2, counts=False), _sample(2, 6, seed=3)]
    x = build_padded(samples, pad_id=0, pad_to=4, min_rows=4)
    assert x.tokens.shape == (4, 8) and x.num_seqs == 2
    for sample, (row, start, end) in zip(samples, x.response_slices):
        assert x.targets[row, start:end].tolist() == sample.response_ids
        assert x.tokens[row, : sample.num_tokens].tolist() == sample.prompt_ids + sample.response_ids
    assert x.loss_mask.sum() == 4 + 6 and not x.loss_mask[1].any() and not x.loss_mask[3].any()
    assert x.seq_ids[0, 2:6].tolist() == [0] * 4 and x.seq_ids[2, 1:7].tolist() == [1] * 6
    assert (x.seq_ids[~x.loss_mask] == -1).all()
    assert x.position_ids[1].tolist() == list(range(8))


def test_packed_layout_restarts_positions_and_records_boundaries():
    samples = [_sample(3, 4, seed=1), _sample(2, 1, seed=2), _sample(4, 3, seed=3)]
    x = build_packed(samples, pad_id=0, pad_to=2)
    p = x.packed_seq_params
    assert p.qkv_format == "thd" and p.cu_seqlens_q.tolist() == [0, 8, 12, 20]
    assert x.tokens.shape == (1, 20) and x.num_seqs == 3
    assert x.position_ids[0, 8:12].tolist() == [0, 1, 2, 3]
    for sample, (row, start, end) in zip(samples, x.response_slices):
        assert x.targets[row, start:end].tolist() == sample.response_ids
    assert x.seq_ids[0][x.loss_mask[0]].tolist() == [0] * 4 + [1] + [2] * 3


def test_sample_checks_its_fields():
    with pytest.raises(ValueError, match="at least one prompt token"):
        Sample(prompt_ids=[], response_ids=[1], group=0, reward=0.0)
    with pytest.raises(ValueError, match="2 values for 1 response tokens"):
        Sample(prompt_ids=[1], response_ids=[1], group=0, reward=0.0,
               rollout_log_probs=[-1.0, -2.0])
    s = _sample(2, 3)
    s.old_log_probs = torch.zeros(3)
    assert s.for_transport().old_log_probs is None


@given(st.lists(st.integers(1, 100), min_size=4, max_size=30), st.integers(20, 300),
       st.integers(2, 4))
@settings(max_examples=60, deadline=None)
def test_interleaved_pipelines_get_a_multiple_of_the_pipeline_size(lengths, budget, pp):
    plans = plan_micro_batches(lengths, budget, padded=True, multiple_of=pp)
    assert len(plans) % pp == 0 and all(plans)
    assert [i for p in plans for i in p] == list(range(len(lengths)))


def test_too_few_samples_for_the_pipeline_is_a_clear_error():
    with pytest.raises(ValueError, match="3 samples cannot fill 4 micro-batches"):
        plan_micro_batches([50, 50, 50], 60, padded=True, multiple_of=4)
    # rounding up would need 6 micro-batches of 4 samples: round down instead
    assert plan_micro_batches([1, 11, 11, 1], 20, padded=True, multiple_of=3) == [[0], [1], [2, 3]]
