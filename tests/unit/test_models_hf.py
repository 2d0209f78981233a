"""Hugging Face config -> ModelShape: the three families, both config dialects, and refusals."""

from __future__ import annotations

import json

import pytest

from megarl.config import ConfigError, ParallelConfig
from megarl.models.hf import load_hf_config, shape_from_hf_config, shape_from_hf_dir
from megarl.models.shape import ModelShape, RopeScaling
from megarl.models.tiny import tiny_config
from megarl.parallel.topology import check_topology


def test_qwen2_has_qkv_bias_and_derived_head_dim():
    shape = shape_from_hf_config(tiny_config("qwen2", tie_word_embeddings=True))
    assert shape == ModelShape(
        family="qwen2", num_layers=4, hidden_size=64, ffn_hidden_size=96, num_attention_heads=4,
        num_query_groups=2, head_dim=16, vocab_size=300, max_position_embeddings=4096,
        rope_theta=10000.0, norm_eps=1e-6, qkv_bias=True, qk_layernorm=False,
        tie_word_embeddings=True,
    )


def test_qwen3_head_dim_is_independent_of_hidden_over_heads():
    shape = shape_from_hf_config(tiny_config("qwen3"))
    assert (shape.head_dim, shape.hidden_size // shape.num_attention_heads) == (24, 16)
    assert shape.qk_layernorm and not shape.qkv_bias and shape.rope_theta == 1e6


def test_llama3_rope_scaling_from_both_config_dialects():
    new = tiny_config("llama").to_dict()
    assert "rope_parameters" in new  # transformers >= 5
    old = {k: v for k, v in new.items() if k != "rope_parameters"}
    old.update(rope_theta=500000.0, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192})
    expected = RopeScaling(factor=8.0)
    for config in (new, old):
        shape = shape_from_hf_config(config)
        assert shape.rope_scaling == expected and shape.rope_theta == 500000.0
    old["rope_scaling"] = None
    assert shape_from_hf_config(old).rope_scaling is None


def test_config_is_read_from_a_directory(tmp_path):
    tiny_config("qwen3").save_pretrained(tmp_path)
    shape, raw = shape_from_hf_dir(tmp_path)
    assert shape.family == "qwen3" and raw["model_type"] == "qwen3"
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_hf_config(tmp_path / "missing")
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json: not valid JSON"):
        load_hf_config(tmp_path)


def _llama(**changes):
    config = tiny_config("llama").to_dict()
    config.update(changes)
    return config


@pytest.mark.parametrize("config, message", [
    ({"model_type": "gpt2"},
     r"model_type 'gpt2' is not supported; megarl converts llama, qwen2, qwen3"),
    (_llama(attention_bias=True), "attention_bias=True cannot be represented"),
    (_llama(mlp_bias=True), "mlp_bias=True cannot be represented"),
    (_llama(hidden_act="gelu"), "hidden_act='gelu'"),
    (_llama(num_local_experts=8), "num_local_experts=8.*mixture-of-experts"),
    (_llama(partial_rotary_factor=0.5), "partial_rotary_factor"),
    ({**tiny_config("qwen2").to_dict(), "use_sliding_window": True}, "sliding-window"),
    ({**tiny_config("qwen3").to_dict(), "layer_types": ["sliding_attention"] * 4}, "layer_types"),
    ({**tiny_config("qwen3").to_dict(), "attention_bias": True}, "attention_bias=True"),
    (_llama(rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}),
     "rope_type 'yarn' is not supported"),
    (_llama(rope_parameters={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 2.0,
                             "high_freq_factor": 4.0, "original_max_position_embeddings": 8192,
                             "rope_theta": 5e5}),
     "low_freq_factor=2.0 cannot be represented: megatron-core 0.16 supports only"),
    (_llama(rope_parameters={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                             "high_freq_factor": 4.0, "original_max_position_embeddings": 4096,
                             "rope_theta": 5e5}),
     "original_max_position_embeddings=4096"),
    (_llama(num_attention_heads=3), "num_attention_heads.*multiple"),
    (_llama(vocab_size=0), "vocab_size must be a positive integer"),
], ids=lambda x: x if isinstance(x, str) else "")
def test_unrepresentable_configs_are_refused(config, message):
    with pytest.raises(ValueError, match=message):
        shape_from_hf_config(config, where="cfg.json")


def test_error_names_the_source(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(_llama(attention_bias=True)))
    with pytest.raises(ValueError, match=f"{tmp_path}/config.json: attention_bias"):
        shape_from_hf_dir(tmp_path)


def test_hand_written_shapes_are_checked_for_megatron_rope_limits():
    common = dict(family="custom", num_layers=2, hidden_size=64, ffn_hidden_size=96,
                  num_attention_heads=4, num_query_groups=2, head_dim=16, vocab_size=300,
                  max_position_embeddings=64)
    ModelShape(**common, rope_scaling=RopeScaling(factor=32.0))  # Llama 3.2: any factor is fine
    with pytest.raises(ValueError, match="high_freq_factor=2.0"):
        ModelShape(**common, rope_scaling=RopeScaling(factor=8.0, high_freq_factor=2.0))


# config.json of the target checkpoints (transformers < 5 dialect), as published.
REAL = {
    "Qwen2.5-Math-7B": (dict(
        model_type="qwen2", hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
        num_attention_heads=28, num_key_value_heads=4, vocab_size=152064, rope_theta=10000.0,
        max_position_embeddings=4096, sliding_window=4096, use_sliding_window=False,
        max_window_layers=28, tie_word_embeddings=False, rms_norm_eps=1e-6, hidden_act="silu",
        rope_scaling=None), 7.62e9),
    "Qwen2.5-32B": (dict(
        model_type="qwen2", hidden_size=5120, intermediate_size=27648, num_hidden_layers=64,
        num_attention_heads=40, num_key_value_heads=8, vocab_size=152064, rope_theta=1e6,
        max_position_embeddings=32768, use_sliding_window=False, tie_word_embeddings=False,
        rms_norm_eps=1e-5, hidden_act="silu"), 32.76e9),
    "Qwen3-32B": (dict(
        model_type="qwen3", hidden_size=5120, intermediate_size=25600, num_hidden_layers=64,
        num_attention_heads=64, num_key_value_heads=8, head_dim=128, vocab_size=151936,
        rope_theta=1000000, max_position_embeddings=40960, attention_bias=False,
        use_sliding_window=False, tie_word_embeddings=False, rms_norm_eps=1e-6,
        hidden_act="silu", rope_scaling=None), 32.76e9),
    "Llama-3.1-8B": (dict(
        model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0,
        rope_scaling={"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 8192, "rope_type": "llama3"},
        max_position_embeddings=131072, attention_bias=False, mlp_bias=False,
        tie_word_embeddings=False, rms_norm_eps=1e-5, hidden_act="silu"), 8.03e9),
}


@pytest.mark.parametrize("name", sorted(REAL))
def test_target_checkpoints_parse_to_their_published_size(name):
    config, params = REAL[name]
    shape = shape_from_hf_config(config, where=name)
    assert abs(shape.num_parameters - params) / params < 0.005
    check_topology(ParallelConfig(tp=4, pp=4), 16, shape)
    if shape.num_query_groups < 8:  # Qwen2.5-Math-7B: 28 heads, 4 KV heads; TP=8 cannot split
        with pytest.raises(ConfigError, match="parallel.tp: 8 does not divide the 28"):
            check_topology(ParallelConfig(tp=8), 8, shape)
    else:
        check_topology(ParallelConfig(tp=8, pp=2), 16, shape)
