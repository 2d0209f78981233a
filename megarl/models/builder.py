"""Build the Megatron GPT model chunks of this rank from a `ModelShape`.

Layer specs come from Megatron's `ModuleSpec` registry: transformer-engine layers on GPU when
transformer-engine is installed, Megatron's local modules otherwise (CPU, tests). With a
virtual pipeline, a rank holds several chunks; otherwise one.
"""

from __future__ import annotations

import torch

from megarl.config import ModelConfig, OptimizerConfig, ParallelConfig
from megarl.models import megatron_config
from megarl.models.shape import ModelShape
from megarl.parallel.groups import ParallelContext
from megarl.parallel.topology import padded_vocab_size


def layer_spec(shape: ModelShape, model: ModelConfig):
    """Megatron's layer spec: transformer-engine modules when in use, local modules otherwise.

    Parameter names differ between the two (transformer-engine fuses the pre-attention and
    pre-MLP norms into `linear_qkv` and `linear_fc1`); `megarl.checkpoint.megatron_layout`
    maps both to one canonical form.
    """
    from megatron.core.models.gpt import gpt_layer_specs

    if megatron_config.use_transformer_engine(model):
        return gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec(
            qk_layernorm=shape.qk_layernorm
        )
    return gpt_layer_specs.get_gpt_layer_local_spec(
        qk_layernorm=shape.qk_layernorm, normalization="RMSNorm"
    )


def build_model_chunks(
    shape: ModelShape, model: ModelConfig, parallel: ParallelConfig, ctx: ParallelContext,
) -> list[torch.nn.Module]:
    """This rank's GPTModel chunks (one per virtual pipeline stage), on this rank's device."""
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel

    config = megatron_config.transformer_config(shape, model, parallel)
    spec = layer_spec(shape, model)
    vocab = padded_vocab_size(shape.vocab_size, parallel.tp, model.make_vocab_size_divisible_by)
    rope = shape.rope_scaling
    chunks = []
    for vp_stage in range(parallel.vpp or 1):
        stage = vp_stage if parallel.vpp else None
        chunk = GPTModel(
            config=config,
            transformer_layer_spec=spec,
            vocab_size=vocab,
            max_sequence_length=shape.max_position_embeddings,
            pre_process=ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=stage),
            post_process=ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=stage),
            share_embeddings_and_output_weights=shape.tie_word_embeddings,
            position_embedding_type="rope",
            # A float base gives the same inverse frequencies as Hugging Face's RoPE; int() would
            # silently change a non-integral theta.
            rotary_base=shape.rope_theta,
            rope_scaling=rope is not None,
            # ModelShape has checked that the other llama3 parameters are Megatron's fixed ones.
            rope_scaling_factor=rope.factor if rope is not None else 8.0,
            vp_stage=stage,
        )
        # Megatron's local norms are built in float32 whatever params_dtype says; Megatron-LM
        # casts the whole module (Float16Module), and so does megarl, so that every parameter,
        # and every tensor the weight export sends, has the model's dtype.
        chunks.append(chunk.to(device=ctx.device, dtype=config.params_dtype))
    return chunks


def wrap_ddp(
    chunks: list[torch.nn.Module], optim: OptimizerConfig, model: ModelConfig,
) -> list[torch.nn.Module]:
    """Megatron's DistributedDataParallel around every chunk (contiguous gradient buffers)."""
    from megatron.core.distributed import DistributedDataParallel

    ddp = megatron_config.ddp_config(optim, model)
    wrapped = []
    for i, chunk in enumerate(chunks):
        wrapped.append(
            DistributedDataParallel(
                config=chunk.config, ddp_config=ddp, module=chunk,
                # Only the first chunk may skip the bucket split (Megatron's own rule).
                disable_bucketing=i > 0,
            )
        )
    return wrapped
