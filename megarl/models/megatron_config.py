"""Megatron's configuration objects, built from megarl's in exactly one place.

`TransformerConfig` comes from a `ModelShape` plus the `model` and `parallel` sections;
`OptimizerConfig` and `DistributedDataParallelConfig` from the `optimizer` section. Nothing
else in megarl constructs these, and Megatron-LM's argparse is never involved.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from megarl import platform
from megarl.config import ModelConfig, OptimizerConfig, ParallelConfig
from megarl.models.shape import ModelShape

_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


def torch_dtype(name: str) -> torch.dtype:
    return _DTYPES[name]


def use_transformer_engine(model: ModelConfig) -> bool:
    """Whether layers come from transformer-engine (the default on GPU when it is installed)."""
    if model.transformer_impl == "local":
        return False
    available = platform.has_cuda() and platform.has_transformer_engine()
    if model.transformer_impl == "transformer_engine" and not available:
        raise RuntimeError(
            "model.transformer_impl=transformer_engine needs CUDA and transformer-engine "
            "(pip install 'megarl[gpu]'); use auto or local on this machine"
        )
    return available


def transformer_config(shape: ModelShape, model: ModelConfig, parallel: ParallelConfig):
    """Megatron's TransformerConfig for `shape` under `parallel`."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    dtype = torch_dtype(model.dtype)
    te = use_transformer_engine(model)
    on_gpu = platform.has_cuda()
    return TransformerConfig(
        num_layers=shape.num_layers,
        hidden_size=shape.hidden_size,
        ffn_hidden_size=shape.ffn_hidden_size,
        num_attention_heads=shape.num_attention_heads,
        num_query_groups=shape.num_query_groups,
        kv_channels=shape.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=shape.norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=shape.qkv_bias,
        qk_layernorm=shape.qk_layernorm,
        # RL fine-tuning never uses dropout: it would make log-probs stochastic.
        hidden_dropout=0.0,
        attention_dropout=0.0,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        tensor_model_parallel_size=parallel.tp,
        pipeline_model_parallel_size=parallel.pp,
        virtual_pipeline_model_parallel_size=parallel.vpp,
        context_parallel_size=parallel.cp,
        expert_model_parallel_size=parallel.ep,
        sequence_parallel=parallel.sequence_parallel,
        # Responses have different lengths from one micro-batch to the next.
        variable_seq_lengths=True,
        # Unused by dense models, but the default (allgather) refuses variable lengths.
        moe_token_dispatcher_type="alltoall",
        # On CPU, weights are built whole and then split, so every layout starts identical.
        use_cpu_initialization=not on_gpu,
        recompute_granularity=model.recompute_granularity,
        recompute_method="uniform" if model.recompute_granularity == "full" else None,
        recompute_num_layers=(
            model.recompute_num_layers if model.recompute_granularity == "full" else None
        ),
        # Fused kernels exist only on GPU.
        bias_dropout_fusion=on_gpu,
        apply_rope_fusion=te,
        masked_softmax_fusion=on_gpu,
        persist_layer_norm=on_gpu,
        gradient_accumulation_fusion=te,
        cross_entropy_loss_fusion=False,
        # With two pipeline stages the previous and the next rank are the same peer, and the
        # batched path posts [send_prev, send_next] against the peer's [recv_prev, recv_next], so
        # the interleaved schedule receives gradients as activations (seen on gloo, same-size
        # tensors, silently). The unbatched path keeps the two directions on separate groups.
        batch_p2p_comm=False,
        # megarl's losses are normalised over the whole optimizer step already (all micro-batches,
        # all data-parallel ranks). In per-token mode Megatron neither divides the loss by the
        # number of micro-batches nor averages gradients over DP; the actor reports a token
        # count of 0 so finalize_model_grads does not rescale either.
        calculate_per_token_loss=True,
    )


def optimizer_config(optim: OptimizerConfig, model: ModelConfig):
    """Megatron's OptimizerConfig (Adam with decoupled weight decay)."""
    from megatron.core.optimizer import OptimizerConfig as MegatronOptimizerConfig

    dtype = torch_dtype(model.dtype)
    return MegatronOptimizerConfig(
        optimizer="adam",
        lr=optim.lr,
        min_lr=optim.min_lr,
        weight_decay=optim.weight_decay,
        adam_beta1=optim.adam_beta1,
        adam_beta2=optim.adam_beta2,
        adam_eps=optim.adam_eps,
        clip_grad=optim.clip_grad,
        bf16=dtype == torch.bfloat16,
        params_dtype=dtype,
        use_distributed_optimizer=optim.use_distributed_optimizer,
    )


def ddp_config(optim: OptimizerConfig, model: ModelConfig):
    """Megatron's DistributedDataParallelConfig."""
    from megatron.core.distributed import DistributedDataParallelConfig

    on_gpu = platform.has_cuda()
    return DistributedDataParallelConfig(
        grad_reduce_in_fp32=optim.grad_reduce_in_fp32,
        use_distributed_optimizer=optim.use_distributed_optimizer,
        # Overlap needs CUDA streams; on CPU communication is synchronous anyway.
        overlap_grad_reduce=on_gpu,
        # Never deferred: with overlap the distributed optimizer gathers updated parameters only
        # at the next forward, but the weight export for the servers reads them right after the
        # optimizer step and would send other DP ranks' shards stale.
        overlap_param_gather=False,
        check_for_nan_in_grad=False,
    )
