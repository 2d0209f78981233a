"""Hugging Face `config.json` -> `ModelShape`, for the families megarl converts exactly.

Supported `model_type`s: `qwen2` (Qwen2 and Qwen2.5: bias on q/k/v), `qwen3` (RMSNorm on each
query and key head, `head_dim` independent of hidden/heads), `llama` (Llama 3.x, optionally
with llama3 RoPE scaling). Anything megarl's Megatron model would compute differently is
refused with the config key that causes it (sliding-window attention, extra biases, experts,
RoPE variants megatron-core 0.16 does not implement), because a silent mismatch is worse than
no conversion.

Both config dialects are read: transformers < 5 (`rope_theta`, `rope_scaling`) and
transformers >= 5 (`rope_parameters`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from megarl.models.shape import ModelShape, RopeScaling, check_rope_scaling


@dataclass(frozen=True)
class FamilySpec:
    """What a family's architecture fixes, independent of its size."""

    qkv_bias: bool
    """q/k/v projections carry a bias (no config key: the HF model class hard-codes it)."""

    qk_layernorm: bool
    """RMSNorm over head_dim on every query and key head, before RoPE."""

    forbidden: tuple[tuple[str, Any], ...] = ()
    """(config key, value) pairs that change the computation beyond what megarl represents."""


FAMILIES: dict[str, FamilySpec] = {
    "qwen2": FamilySpec(qkv_bias=True, qk_layernorm=False),
    "qwen3": FamilySpec(qkv_bias=False, qk_layernorm=True, forbidden=(("attention_bias", True),)),
    "llama": FamilySpec(qkv_bias=False, qk_layernorm=False,
                        forbidden=(("attention_bias", True), ("mlp_bias", True))),
}
"""Registered by Hugging Face `model_type` (exact match, never substrings)."""

# Keys that mean mixture-of-experts when present with a positive value.
_EXPERT_KEYS = ("num_experts", "num_local_experts", "moe_intermediate_size", "n_routed_experts")


def supported_model_types() -> list[str]:
    return sorted(FAMILIES)


def load_hf_config(hf_dir: str | Path) -> dict[str, Any]:
    """The raw `config.json` of a Hugging Face checkpoint directory, as a dict."""
    path = Path(hf_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no config.json (is {hf_dir} a Hugging Face model dir?)")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from err
    if not isinstance(config, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(config).__name__}")
    return config


def shape_from_hf_config(config: Mapping[str, Any] | Any, where: str = "config") -> ModelShape:
    """The `ModelShape` of a Hugging Face config (a dict, or a transformers config object).

    `where` names the source in error messages (e.g. the path of config.json).
    """
    if not isinstance(config, Mapping):
        config = config.to_dict()
    model_type = config.get("model_type")
    family = FAMILIES.get(model_type)
    if family is None:
        raise ValueError(
            f"{where}: model_type {model_type!r} is not supported; megarl converts "
            f"{', '.join(supported_model_types())}"
        )
    _check_representable(config, family, where)
    hidden = _positive_int(config, "hidden_size", where)
    heads = _positive_int(config, "num_attention_heads", where)
    groups = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim")
    if head_dim is None:
        if hidden % heads:
            raise ValueError(f"{where}: hidden_size {hidden} is not a multiple of "
                             f"num_attention_heads {heads} and head_dim is not given")
        head_dim = hidden // heads
    theta, rope = _rope(config, where)
    try:
        return ModelShape(
            family=model_type,
            num_layers=_positive_int(config, "num_hidden_layers", where),
            hidden_size=hidden,
            ffn_hidden_size=_positive_int(config, "intermediate_size", where),
            num_attention_heads=heads,
            num_query_groups=groups,
            head_dim=head_dim,
            vocab_size=_positive_int(config, "vocab_size", where),
            max_position_embeddings=_positive_int(config, "max_position_embeddings", where),
            rope_theta=theta,
            rope_scaling=rope,
            norm_eps=float(config.get("rms_norm_eps", 1e-6)),
            qkv_bias=family.qkv_bias,
            qk_layernorm=family.qk_layernorm,
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        )
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from err


def shape_from_hf_dir(hf_dir: str | Path) -> tuple[ModelShape, dict[str, Any]]:
    """Shape and raw config of the checkpoint in `hf_dir`."""
    config = load_hf_config(hf_dir)
    return shape_from_hf_config(config, where=str(Path(hf_dir) / "config.json")), config


def _positive_int(config: Mapping[str, Any], key: str, where: str) -> int:
    value = config.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{where}: {key} must be a positive integer, got {value!r}")
    return value


def _check_representable(config: Mapping[str, Any], family: FamilySpec, where: str) -> None:
    def refuse(key: str, why: str) -> None:
        raise ValueError(f"{where}: {key}={config.get(key)!r} cannot be represented exactly "
                         f"by megarl's Megatron model ({why})")

    if config.get("hidden_act", "silu") != "silu":
        refuse("hidden_act", "the MLP is SwiGLU with silu")
    for key, value in family.forbidden:
        if config.get(key) == value:
            refuse(key, "the extra biases have no Megatron counterpart here")
    if config.get("use_sliding_window"):
        refuse("use_sliding_window", "sliding-window attention is not supported")
    layer_types = config.get("layer_types") or []
    if any(t != "full_attention" for t in layer_types):
        refuse("layer_types", "every layer must be full attention")
    for key in _EXPERT_KEYS:
        if config.get(key):
            refuse(key, "mixture-of-experts models are not supported")
    if config.get("partial_rotary_factor", 1.0) != 1.0:
        refuse("partial_rotary_factor", "RoPE must rotate the whole head")


def _rope(config: Mapping[str, Any], where: str) -> tuple[float, RopeScaling | None]:
    """RoPE base and scaling from either config dialect."""
    params = config.get("rope_parameters")
    if isinstance(params, Mapping):
        scaling, key = params, "rope_parameters"
        theta = params.get("rope_theta", config.get("rope_theta", 10000.0))
    else:
        scaling, key = config.get("rope_scaling") or {}, "rope_scaling"
        theta = config.get("rope_theta", 10000.0)
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type in (None, "default"):
        return float(theta), None
    if rope_type != "llama3":
        raise ValueError(f"{where}: {key} rope_type {rope_type!r} is not supported (megatron-core "
                         "0.16 implements plain RoPE and llama3 scaling only)")
    missing = [k for k in ("factor", "low_freq_factor", "high_freq_factor",
                           "original_max_position_embeddings") if k not in scaling]
    if missing:
        raise ValueError(f"{where}: {key} (llama3) lacks {', '.join(missing)}")
    rope = RopeScaling(
        factor=float(scaling["factor"]),
        low_freq_factor=float(scaling["low_freq_factor"]),
        high_freq_factor=float(scaling["high_freq_factor"]),
        original_max_position_embeddings=int(scaling["original_max_position_embeddings"]),
    )
    check_rope_scaling(rope, f"{where}: {key}")
    return float(theta), rope
