"""Transformer-engine layers (GPU only): their parameter names map onto the same canonical names
as the local spec, HF weights load into them with HF's logits, a converted checkpoint loads
into them, and the export and a saved checkpoint give back the HF tensors bit for bit."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from megarl import platform
from megarl.models.tiny import save_random_hf_checkpoint, tiny_config
from tests.harness import run_distributed

pytestmark = pytest.mark.skipif(
    not (platform.has_cuda() and platform.has_transformer_engine()),
    reason="needs CUDA and transformer-engine",
)
TOL = 1e-3  # transformer-engine kernels differ from HF's in the last bits


def _te_model(hf_dir, megatron_dir, saved_dir, prompt):
    from megatron.core import parallel_state as ps

    from megarl.checkpoint.adapters import adapter_for
    from megarl.checkpoint.export import export_hf_weights
    from megarl.checkpoint.model_io import (
        canonical_parameters, load_hf_into_model, load_megatron_checkpoint,
        save_megatron_checkpoint,
    )
    from megarl.checkpoint.transforms import Dims
    from megarl.checkpoint.verify import model_logits
    from megarl.config import ModelConfig, ParallelConfig
    from megarl.models.builder import build_model_chunks
    from megarl.models.hf import shape_from_hf_dir
    from megarl.parallel import init_distributed

    shape, config = shape_from_hf_dir(hf_dir)
    parallel = ParallelConfig()
    ctx = init_distributed(parallel, shape)
    model_cfg = ModelConfig(hf_dir=str(hf_dir), dtype="float32",
                            transformer_impl="transformer_engine")
    chunks = build_model_chunks(shape, model_cfg, parallel, ctx)
    names = sorted(name for name, _ in canonical_parameters(chunks, shape))
    expected = sorted(adapter_for(shape.family).megatron_shapes(Dims(shape, 384)))
    load_hf_into_model(chunks, hf_dir, ctx, shape)
    from_hf = model_logits(chunks, [prompt.cuda()], ctx, shape.vocab_size)[0]
    exported = {n: t.cpu().clone() for n, t in export_hf_weights(chunks, shape, ctx)}
    save_megatron_checkpoint(chunks, saved_dir, ctx, shape, hf_config=config)
    ps.destroy_model_parallel()

    ctx = init_distributed(parallel, shape)
    chunks = build_model_chunks(shape, model_cfg, parallel, ctx)
    load_megatron_checkpoint(chunks, megatron_dir, ctx)
    from_checkpoint = model_logits(chunks, [prompt.cuda()], ctx, shape.vocab_size)[0]
    ps.destroy_model_parallel()
    return names, expected, from_hf, from_checkpoint, exported


def _convert(hf_dir, out_dir):
    from megarl.checkpoint.convert import hf_to_megatron

    hf_to_megatron(hf_dir, out_dir, progress="off")


@pytest.mark.parametrize("family", ["qwen2", "qwen3", "llama"])
def test_transformer_engine_layers(tmp_path, family):
    from tests.distributed.test_convert_roundtrip import _assert_same_safetensors, _back_to_hf

    hf_dir, megatron_dir, saved = tmp_path / "hf", tmp_path / "mg", tmp_path / "saved"
    model = save_random_hf_checkpoint(tiny_config(family), hf_dir, seed=6)
    prompt = torch.randint(0, 300, (16,), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = model(prompt[None]).logits[0]
    run_distributed(_convert, 1, args=(hf_dir, megatron_dir), timeout=240)
    [(names, expected, from_hf, from_ckpt, exported)] = run_distributed(
        _te_model, 1, args=(hf_dir, megatron_dir, saved, prompt), timeout=240)

    assert names == expected, "transformer-engine names do not map onto the canonical ones"
    assert (from_hf - reference).abs().max().item() < TOL
    assert (from_ckpt - reference).abs().max().item() < TOL
    original = load_file(hf_dir / "model.safetensors")
    assert sorted(exported) == sorted(original)
    assert all(torch.equal(exported[k], v) for k, v in original.items())
    run_distributed(_back_to_hf, 1, args=({family: saved}, {family: hf_dir},
                                          {family: tmp_path / "back"}), timeout=240)
    _assert_same_safetensors(hf_dir, tmp_path / "back")
