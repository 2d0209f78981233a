"""`model`: which checkpoint to train and how the Megatron model is built from it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from omegaconf import MISSING

from .errors import check_choice, check_positive

DTYPES = ("bfloat16", "float32")


@dataclass(kw_only=True)
class ModelConfig:
    hf_dir: str = MISSING
    """Hugging Face checkpoint directory (config.json, tokenizer files, safetensors). The model
    family comes from its `model_type`; the tokenizer and the servers' weights come from here."""

    megatron_dir: Optional[str] = None
    """Megatron distributed checkpoint written by tools/convert_hf_to_megatron.py. When null the
    Hugging Face weights in `hf_dir` are converted in memory at start-up."""

    dtype: str = "bfloat16"
    """Parameter and compute dtype of the actor: bfloat16 (GPU) or float32 (CPU, tests)."""

    transformer_impl: str = "auto"
    """Layer implementation: transformer_engine, local (Megatron's own modules), or auto
    (transformer_engine when CUDA and transformer-engine are present, local otherwise)."""

    make_vocab_size_divisible_by: int = 128
    """The embedding and output layer are padded to a multiple of this times the TP size."""

    recompute_granularity: Optional[str] = None
    """Activation recomputation: null (off), full or selective."""

    recompute_num_layers: int = 1
    """With full recomputation, how many layers form one recomputed chunk."""

    def validate(self) -> None:
        check_choice("model", "dtype", self.dtype, DTYPES)
        check_choice("model", "transformer_impl", self.transformer_impl,
                     ("auto", "transformer_engine", "local"))
        check_positive("model", "make_vocab_size_divisible_by", self.make_vocab_size_divisible_by)
        if self.recompute_granularity is not None:
            check_choice("model", "recompute_granularity", self.recompute_granularity,
                         ("full", "selective"))
        check_positive("model", "recompute_num_layers", self.recompute_num_layers)
