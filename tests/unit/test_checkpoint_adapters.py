"""Per-family adapters, layout transforms and canonical names: exact layouts, round trips, and
the errors a mismatched checkpoint produces."""

from __future__ import annotations

import pytest
import torch

from megarl.checkpoint import megatron_layout as layout
from megarl.checkpoint.adapters import ADAPTERS, adapter_for
from megarl.checkpoint.export import bucket_by_bytes
from megarl.checkpoint.transforms import FUSED_QKV, GATE_UP, PADDED_VOCAB, Dims
from megarl.models.hf import shape_from_hf_config
from megarl.models.shape import ModelShape
from megarl.models.tiny import random_hf_model, tiny_config

QKV = "decoder.layers.0.self_attention.linear_qkv.weight"


def _shape(**kw) -> ModelShape:
    base = dict(family="qwen2", num_layers=1, hidden_size=1, ffn_hidden_size=2,
                num_attention_heads=4, num_query_groups=2, head_dim=1, vocab_size=3,
                max_position_embeddings=8, qkv_bias=True)
    return ModelShape(**{**base, **kw})


def test_qkv_is_interleaved_by_query_group_and_tp_ranks_get_whole_groups():
    dims = Dims(_shape(), padded_vocab=4)
    q = torch.tensor([[0.0], [1.0], [2.0], [3.0]])  # heads 0,1 in group 0; 2,3 in group 1
    k, v = torch.tensor([[10.0], [11.0]]), torch.tensor([[20.0], [21.0]])
    fused = FUSED_QKV.from_hf([q, k, v], dims)
    assert fused.flatten().tolist() == [0, 1, 10, 20, 2, 3, 11, 21]
    assert layout.shard(QKV, fused, 1, 2).flatten().tolist() == [2, 3, 11, 21]
    back = FUSED_QKV.to_hf(fused, dims)
    assert all(torch.equal(a, b) for a, b in zip(back, (q, k, v)))
    bias = FUSED_QKV.from_hf([q[:, 0], k[:, 0], v[:, 0]], dims)
    assert bias.tolist() == [0, 1, 10, 20, 2, 3, 11, 21]


def test_gate_up_and_vocab_padding():
    dims = Dims(_shape(), padded_vocab=8)
    gate, up = torch.ones(2, 1), 2 * torch.ones(2, 1)
    assert GATE_UP.from_hf([gate, up], dims).flatten().tolist() == [1, 1, 2, 2]
    embedding = torch.arange(3.0)[:, None]
    padded = PADDED_VOCAB.from_hf([embedding], dims)
    assert padded.flatten().tolist() == [0, 1, 2, 0, 0, 0, 0, 0]
    assert torch.equal(PADDED_VOCAB.to_hf(padded, dims)[0], embedding)


@pytest.mark.parametrize("family, tied", [("qwen2", True), ("qwen3", False), ("llama", False)])
def test_hf_state_dict_survives_a_round_trip_bit_for_bit(family, tied):
    config = tiny_config(family, tie_word_embeddings=tied, num_hidden_layers=2)
    state = random_hf_model(config).state_dict()
    shape = shape_from_hf_config(config)
    adapter = adapter_for(family)
    dims = Dims(shape, padded_vocab=384)
    back = {}
    for name, full_shape in adapter.megatron_shapes(dims).items():
        full = adapter.from_hf(name, state.__getitem__, dims)
        assert tuple(full.shape) == full_shape
        back.update(adapter.to_hf(name, full, dims))
    expected = {k: v for k, v in state.items() if not (tied and k == "lm_head.weight")}
    assert sorted(back) == sorted(expected)
    for name, tensor in expected.items():
        assert torch.equal(back[name], tensor), name


def test_wrong_shapes_name_the_tensor():
    shape = shape_from_hf_config(tiny_config("llama"))
    state = random_hf_model(tiny_config("llama", num_hidden_layers=1)).state_dict()
    state["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(16, 64)
    dims = Dims(shape, padded_vocab=384)
    with pytest.raises(ValueError, match=r"model.layers.0.self_attn.k_proj.weight: shape \(16, 64\)"
                       r" does not match the model config, which implies \(32, 64\)"):
        adapter_for("llama").from_hf(QKV, state.__getitem__, dims)
    with pytest.raises(ValueError, match="output_layer.weight: shape"):
        adapter_for("llama").to_hf("output_layer.weight", torch.zeros(300, 64), dims)


def test_checkpoint_contents_are_checked_against_the_config():
    config = tiny_config("qwen3", num_hidden_layers=2, tie_word_embeddings=True)
    shape = shape_from_hf_config(config)
    available = {n: tuple(t.shape) for n, t in random_hf_model(config).state_dict().items()}
    available["lm_head.weight"] = (300, 64)  # ignored with tied embeddings, as HF does
    available["model.layers.0.self_attn.rotary_emb.inv_freq"] = (12,)
    adapter_for("qwen3").check_hf_tensors(available, shape, "ckpt")
    del available["model.layers.1.mlp.up_proj.weight"]
    available["model.layers.0.self_attn.q_norm.weight"] = (16,)
    available["model.layers.2.mlp.up_proj.weight"] = (96, 64)
    with pytest.raises(ValueError) as err:
        adapter_for("qwen3").check_hf_tensors(available, shape, "ckpt")
    text = str(err.value)
    assert text.startswith("ckpt: the weights do not match the config (qwen3, 2 layers")
    assert "missing (1): model.layers.1.mlp.up_proj.weight" in text
    assert "wrong shape (1): model.layers.0.self_attn.q_norm.weight (16,)" in text
    assert "unexpected (1): model.layers.2.mlp.up_proj.weight" in text


def test_adapters_are_registered_by_model_type_and_refuse_other_shapes():
    assert sorted(ADAPTERS) == ["llama", "qwen2", "qwen3"]
    with pytest.raises(ValueError, match="no checkpoint adapter for model_type 'qwen2_moe'"):
        adapter_for("qwen2_moe")
    with pytest.raises(ValueError, match="qwen2 models have qkv_bias=True"):
        adapter_for("qwen2").rules(_shape(qkv_bias=False))


@pytest.mark.parametrize("name, offset, canonical", [
    ("module.module.decoder.layers.1.input_layernorm.weight", 4,
     "decoder.layers.5.self_attention.linear_qkv.layer_norm_weight"),
    ("decoder.layers.0.self_attention.linear_qkv.layer_norm_weight", 2,
     "decoder.layers.2.self_attention.linear_qkv.layer_norm_weight"),
    ("decoder.layers.3.pre_mlp_layernorm.weight", 0,
     "decoder.layers.3.mlp.linear_fc1.layer_norm_weight"),
    ("module.output_layer.weight", 6, "output_layer.weight"),
])
def test_local_and_transformer_engine_names_have_one_canonical_form(name, offset, canonical):
    assert layout.canonical_name(name, offset) == canonical


def test_checkpoint_keys_and_full_shapes():
    assert layout.checkpoint_key("decoder.layers.12.mlp.linear_fc2.weight") == (
        "decoder.layers.mlp.linear_fc2.weight", 12)
    assert layout.checkpoint_key("decoder.final_layernorm.weight") == (
        "decoder.final_layernorm.weight", None)
    assert layout.full_shape("decoder.layers.0.mlp.linear_fc1.weight", (96, 64), 2) == (192, 64)
    assert layout.full_shape("decoder.layers.0.mlp.linear_fc2.weight", (64, 48), 2) == (64, 96)
    assert layout.full_shape("decoder.final_layernorm.weight", (64,), 2) == (64,)


def test_bucket_by_bytes_keeps_order_and_budget():
    pairs = [(f"t{i}", torch.zeros(n, dtype=torch.float32)) for i, n in enumerate([2, 2, 5, 1, 1])]
    buckets = list(bucket_by_bytes(iter(pairs), max_bytes=16))
    assert [[n for n, _ in b] for b in buckets] == [["t0", "t1"], ["t2"], ["t3", "t4"]]
    assert list(bucket_by_bytes(iter([]), 16)) == []
    with pytest.raises(ValueError, match="max_bytes must be positive"):
        list(bucket_by_bytes(iter(pairs), 0))
