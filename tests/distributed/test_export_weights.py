"""Live model at TP=2 x PP=2: HF weights loaded straight into the shards give the HF logits, the
streaming export gives back the HF state dict exactly (on global rank 0 only), and a
checkpoint saved from the live shards converts back to the original HF tensors bit for bit."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from megarl.models.tiny import save_random_hf_checkpoint, tiny_config
from tests.distributed.test_convert_roundtrip import _assert_same_safetensors, _back_to_hf
from tests.harness import run_distributed

TOL = 1e-4
# family -> (config overrides, dtype); the bfloat16 model checks that the export keeps dtypes.
CASES = {"qwen2": (dict(tie_word_embeddings=True), torch.float32),
         "qwen3": ({}, torch.float32),
         "llama": ({}, torch.bfloat16)}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    base = tmp_path_factory.mktemp("export")
    prompt = torch.randint(0, 300, (10,), generator=torch.Generator().manual_seed(5))
    out = {}
    for family, (overrides, dtype) in CASES.items():
        model = save_random_hf_checkpoint(tiny_config(family, **overrides), base / family,
                                          seed=2, dtype=dtype)
        with torch.no_grad():
            logits = model(prompt[None]).logits[0] if dtype == torch.float32 else None
        out[family] = (base / family, logits)
    return out, prompt


def _live_tp2_pp2(hf_dirs, save_dirs, prompt):
    from megatron.core import parallel_state as ps

    from megarl.checkpoint.export import (
        bucket_by_bytes, export_hf_weights, export_hf_weights_everywhere,
    )
    from megarl.checkpoint.model_io import load_hf_into_model, save_megatron_checkpoint
    from megarl.checkpoint.verify import model_logits
    from megarl.config import ModelConfig, ParallelConfig
    from megarl.models.builder import build_model_chunks
    from megarl.models.hf import shape_from_hf_dir
    from megarl.parallel import init_distributed

    results = {}
    for family, hf_dir in hf_dirs.items():
        shape, config = shape_from_hf_dir(hf_dir)
        parallel = ParallelConfig(tp=2, pp=2)
        ctx = init_distributed(parallel, shape)
        dtype = "bfloat16" if CASES[family][1] == torch.bfloat16 else "float32"
        chunks = build_model_chunks(shape, ModelConfig(hf_dir=str(hf_dir), dtype=dtype),
                                    parallel, ctx)
        load_hf_into_model(chunks, hf_dir, ctx, shape)
        logits = model_logits(chunks, [prompt], ctx, shape.vocab_size) if dtype == "float32" \
            else None
        buckets = list(bucket_by_bytes(export_hf_weights(chunks, shape, ctx), 64 * 1024))
        exported = {name: t.clone() for bucket in buckets for name, t in bucket}
        everywhere = {n: t.clone() for n, t in export_hf_weights_everywhere(chunks, shape, ctx)}
        save_megatron_checkpoint(chunks, save_dirs[family], ctx, shape, hf_config=config)
        results[family] = {"logits": logits, "exported": exported, "buckets": len(buckets),
                           "everywhere": everywhere}
        ps.destroy_model_parallel()
    return results


def test_live_load_export_and_save_at_tp2_pp2(models):
    models, prompt = models
    hf_dirs = {f: hf for f, (hf, _) in models.items()}
    save_dirs = {f: hf.parent / f"{f}-saved" for f, hf in hf_dirs.items()}
    ranks = run_distributed(_live_tp2_pp2, 4, args=(hf_dirs, save_dirs, prompt), timeout=240)

    for family, (hf_dir, reference) in models.items():
        original = load_file(hf_dir / "model.safetensors")
        exported = ranks[0][family]["exported"]
        assert sorted(exported) == sorted(original), family
        for name, tensor in original.items():
            assert exported[name].dtype == tensor.dtype, f"{family} {name}"
            assert torch.equal(exported[name], tensor), f"{family} {name}"
        assert ranks[0][family]["buckets"] > 1
        assert all(not r[family]["exported"] for r in ranks[1:]), "only rank 0 receives"
        for rank, r in enumerate(ranks):   # the colocated export: every rank gets everything
            assert sorted(r[family]["everywhere"]) == sorted(original), (family, rank)
            for name, tensor in original.items():
                assert torch.equal(r[family]["everywhere"][name], tensor), (family, rank, name)

        if reference is not None:
            # Megatron's ranks: tp fastest, then pp, so the last stage's TP rank 0 is rank 2.
            logits = [r[family]["logits"] for r in ranks if r[family]["logits"] is not None]
            assert len(logits) == 1
            diff = (logits[0][0] - reference).abs().max().item()
            assert diff < TOL, f"{family}: live logits differ from HF by {diff}"

    back = {f: d.parent / f"{f}-saved-hf" for f, d in save_dirs.items()}
    run_distributed(_back_to_hf, 1, args=(save_dirs, hf_dirs, back), timeout=240)
    for family, hf_dir in hf_dirs.items():
        _assert_same_safetensors(hf_dir, back[family])
