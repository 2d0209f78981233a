"""`ModelShape`: what megarl needs to know about a dense decoder-only transformer, independent of
the checkpoint format. It is derived from a Hugging Face config (`megarl.models.hf`) or written
by hand in tests, and turned into Megatron's configs in exactly one place
(`megarl.models.megatron_config`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True, kw_only=True)
class RopeScaling:
    """Llama 3.x frequency-dependent RoPE scaling."""

    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


# megatron-core 0.16 takes only the factor; the other three are fixed inside its RoPE.
MEGATRON_ROPE_FIXED = {
    "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192,
}


def check_rope_scaling(rope: RopeScaling, where: str) -> None:
    """Raise unless megatron-core reproduces `rope` exactly (`where` names the source)."""
    if not rope.factor > 0:
        raise ValueError(f"{where}: RoPE scaling factor must be positive, got {rope.factor!r}")
    for name, fixed in MEGATRON_ROPE_FIXED.items():
        value = getattr(rope, name)
        if value != fixed:
            raise ValueError(
                f"{where}: llama3 RoPE scaling with {name}={value!r} cannot be represented: "
                f"megatron-core 0.16 supports only {name}={fixed!r} "
                f"(with any factor); converting would change the model's outputs"
            )


@dataclass(frozen=True, kw_only=True)
class ModelShape:
    family: str
    """The Hugging Face `model_type` the shape came from (qwen2, qwen3, llama) or `custom`."""

    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    """Key/value heads (grouped-query attention); equal to num_attention_heads for MHA."""

    head_dim: int
    vocab_size: int
    """The real vocabulary (rows of the HF embedding), before padding for tensor parallelism."""

    max_position_embeddings: int
    rope_theta: float = 10000.0
    rope_scaling: Optional[RopeScaling] = None
    norm_eps: float = 1e-6
    qkv_bias: bool = False
    qk_layernorm: bool = False
    tie_word_embeddings: bool = False

    def __post_init__(self) -> None:
        for name in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
                     "num_query_groups", "head_dim", "vocab_size", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"ModelShape.{name} must be a positive integer, got {value!r}")
        if self.rope_scaling is not None:
            check_rope_scaling(self.rope_scaling, "ModelShape.rope_scaling")
        if self.num_attention_heads % self.num_query_groups:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) is not a multiple of "
                f"num_query_groups ({self.num_query_groups})"
            )

    @property
    def num_parameters(self) -> int:
        """Parameter count of the unpadded model (embeddings counted once when tied)."""
        h, f = self.hidden_size, self.ffn_hidden_size
        q = self.num_attention_heads * self.head_dim
        kv = self.num_query_groups * self.head_dim
        attention = h * (q + 2 * kv) + q * h + (q + 2 * kv if self.qkv_bias else 0)
        mlp = 3 * h * f
        norms = 2 * h + (2 * self.head_dim if self.qk_layernorm else 0)
        embeddings = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * (attention + mlp + norms) + embeddings + h
