"""`optimizer`: Megatron's Adam, learning-rate schedule and gradient clipping."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from .errors import check_choice, check_non_negative, check_positive, check_range


@dataclass(kw_only=True)
class OptimizerConfig:
    lr: float = 1e-6
    """Peak learning rate."""

    min_lr: float = 0.0
    """Learning rate at the end of a linear or cosine decay."""

    lr_warmup_steps: int = 0
    """Optimizer steps of linear warm-up from 0 to `lr`."""

    lr_decay_style: str = "constant"
    """After warm-up: constant, linear or cosine (down to `min_lr`)."""

    lr_decay_steps: Optional[int] = None
    """Optimizer steps over which the decay runs; null means the whole run."""

    weight_decay: float = 0.1
    """Decoupled (AdamW) weight decay."""

    adam_beta1: float = 0.9
    """Adam's first-moment coefficient."""

    adam_beta2: float = 0.999
    """Adam's second-moment coefficient."""

    adam_eps: float = 1e-8
    """Adam's epsilon."""

    clip_grad: float = 1.0
    """Global gradient-norm clipping threshold; 0 switches clipping off."""

    use_distributed_optimizer: bool = True
    """Shard optimizer state over data-parallel ranks (ZeRO-1)."""

    grad_reduce_in_fp32: bool = True
    """Accumulate and all-reduce gradients in float32 when the model is bfloat16."""

    def validate(self) -> None:
        check_positive("optimizer", "lr", self.lr)
        check_range("optimizer", "min_lr", self.min_lr, low=0, high=self.lr)
        check_non_negative("optimizer", "lr_warmup_steps", self.lr_warmup_steps)
        check_choice("optimizer", "lr_decay_style", self.lr_decay_style,
                     ("constant", "linear", "cosine"))
        check_positive("optimizer", "lr_decay_steps", self.lr_decay_steps)
        check_non_negative("optimizer", "weight_decay", self.weight_decay)
        check_range("optimizer", "adam_beta1", self.adam_beta1, low=0, high=1, high_open=True)
        check_range("optimizer", "adam_beta2", self.adam_beta2, low=0, high=1, high_open=True)
        check_positive("optimizer", "adam_eps", self.adam_eps)
        check_non_negative("optimizer", "clip_grad", self.clip_grad)
