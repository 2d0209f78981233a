"""Megatron's optimizer (distributed when configured) and learning-rate schedule for the actor."""

from __future__ import annotations

from megarl.config import ModelConfig, OptimizerConfig
from megarl.models import megatron_config


def build_optimizer(chunks, optim: OptimizerConfig, model: ModelConfig, total_steps: int):
    """Megatron optimizer over the DDP-wrapped `chunks` and its parameter scheduler.

    `total_steps` is the number of optimizer steps of the run; it sets the decay length when
    `optimizer.lr_decay_steps` is null. Biases and norm weights get no weight decay (Megatron's
    own grouping).
    """
    from megatron.core.optimizer import get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    optimizer = get_megatron_optimizer(megatron_config.optimizer_config(optim, model), chunks)
    decay_steps = optim.lr_decay_steps or max(total_steps, optim.lr_warmup_steps + 1)
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=0.0 if optim.lr_warmup_steps else optim.lr,
        max_lr=optim.lr,
        min_lr=optim.min_lr,
        lr_warmup_steps=optim.lr_warmup_steps,
        lr_decay_steps=decay_steps,
        lr_decay_style=optim.lr_decay_style,
        start_wd=optim.weight_decay,
        end_wd=optim.weight_decay,
        wd_incr_steps=decay_steps,
        wd_incr_style="constant",
    )
    return optimizer, scheduler
