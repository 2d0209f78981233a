"""The actor's packed (THD) micro-batches with transformer-engine attention on GPU (skipped
without CUDA or transformer-engine): log-probs of several responses packed into one row equal
the Hugging Face model's, each response computed alone."""

from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
              pytest.mark.timeout(600)]
pytest.importorskip("transformer_engine")

from tests.distributed.test_actor import _hf_log_probs, _samples  # noqa: E402
from tests.harness import run_distributed  # noqa: E402


def _packed_log_probs(hf_dir):
    from tests.distributed.test_actor import _actor

    actor, _, ctx = _actor(hf_dir, 1, 1, 1, budget=64)
    assert actor.packed, "transformer-engine layers should select the packed layout"
    samples = _samples()
    plan = actor.plan(samples, iteration=0)
    assert all(m.inputs.packed_seq_params is not None for mini in plan.mini_batches for m in mini)
    actor.compute_log_probs(plan)
    return [s.old_log_probs for s in samples]


def test_packed_log_probs_match_transformers(tmp_path):
    from megarl.models.tiny import save_random_hf_checkpoint, tiny_config

    hf_dir = str(tmp_path / "qwen2")
    save_random_hf_checkpoint(tiny_config("qwen2", head_dim=64, hidden_size=256,
                                          num_attention_heads=4), hf_dir, seed=3)
    [ours] = run_distributed(_packed_log_probs, 1, args=(hf_dir,), timeout=600)
    for got, want in zip(ours, _hf_log_probs(hf_dir, _samples())):
        # float32 model, TE kernels: a little looser than the CPU comparison
        assert (got.double() - want).abs().max() < 5e-3
