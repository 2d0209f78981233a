"""One adapter per model family: Hugging Face names and layouts <-> Megatron's, both ways.

An adapter is a declarative name map (which HF tensors, through which transform of
`megarl.checkpoint.transforms`, make each canonical Megatron parameter) and is registered by
the Hugging Face `model_type`. Every tensor's shape is checked against the `ModelShape` in both
directions, so a config that does not match its weights fails before anything is written.

Megatron names are canonical (`megatron_layout.canonical_name`): global layer numbers,
transformer-engine names for the fused norms, no wrapper prefixes.

    adapter = adapter_for(shape.family)
    full = adapter.from_hf("decoder.layers.0.self_attention.linear_qkv.weight", read, dims)
    pairs = adapter.to_hf("decoder.layers.0.self_attention.linear_qkv.weight", full, dims)
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, Mapping, Protocol, Sequence

import torch

from megarl.checkpoint.transforms import (
    FUSED_QKV, GATE_UP, IDENTITY, PADDED_VOCAB, Dims, Shape, check_shape,
)
from megarl.models.shape import ModelShape

ShapeFn = Callable[[ModelShape], Sequence[Shape]]


@dataclass(frozen=True)
class Rule:
    """Megatron parameter `megatron` is `transform` of the HF tensors `hf` (of `hf_shapes`).

    In layer rules, `{i}` stands for the global layer number.
    """

    megatron: str
    hf: tuple[str, ...]
    transform: object
    hf_shapes: ShapeFn

    def for_layer(self, i: int) -> "Rule":
        hf = tuple(n.replace("{i}", str(i)) for n in self.hf)
        return Rule(self.megatron.replace("{i}", str(i)), hf, self.transform, self.hf_shapes)


def _q(s: ModelShape) -> int:
    return s.num_attention_heads * s.head_dim


def _kv(s: ModelShape) -> int:
    return s.num_query_groups * s.head_dim


_M, _H = "decoder.layers.{i}.", "model.layers.{i}."

# The name map shared by the dense decoder families; the families differ in the optional parts.
EMBEDDING = Rule("embedding.word_embeddings.weight", ("model.embed_tokens.weight",),
                 PADDED_VOCAB, lambda s: [(s.vocab_size, s.hidden_size)])
FINAL_NORM = Rule("decoder.final_layernorm.weight", ("model.norm.weight",), IDENTITY,
                  lambda s: [(s.hidden_size,)])
OUTPUT_LAYER = Rule("output_layer.weight", ("lm_head.weight",), PADDED_VOCAB,
                    lambda s: [(s.vocab_size, s.hidden_size)])
LAYER = (
    Rule(_M + "self_attention.linear_qkv.layer_norm_weight", (_H + "input_layernorm.weight",),
         IDENTITY, lambda s: [(s.hidden_size,)]),
    Rule(_M + "self_attention.linear_qkv.weight",
         tuple(_H + f"self_attn.{p}_proj.weight" for p in "qkv"), FUSED_QKV,
         lambda s: [(_q(s), s.hidden_size), (_kv(s), s.hidden_size), (_kv(s), s.hidden_size)]),
    Rule(_M + "self_attention.linear_proj.weight", (_H + "self_attn.o_proj.weight",), IDENTITY,
         lambda s: [(s.hidden_size, _q(s))]),
    Rule(_M + "mlp.linear_fc1.layer_norm_weight", (_H + "post_attention_layernorm.weight",),
         IDENTITY, lambda s: [(s.hidden_size,)]),
    Rule(_M + "mlp.linear_fc1.weight", (_H + "mlp.gate_proj.weight", _H + "mlp.up_proj.weight"),
         GATE_UP, lambda s: [(s.ffn_hidden_size, s.hidden_size)] * 2),
    Rule(_M + "mlp.linear_fc2.weight", (_H + "mlp.down_proj.weight",), IDENTITY,
         lambda s: [(s.hidden_size, s.ffn_hidden_size)]),
)
QKV_BIAS = (
    Rule(_M + "self_attention.linear_qkv.bias",
         tuple(_H + f"self_attn.{p}_proj.bias" for p in "qkv"), FUSED_QKV,
         lambda s: [(_q(s),), (_kv(s),), (_kv(s),)]),
)
QK_NORM = (
    Rule(_M + "self_attention.q_layernorm.weight", (_H + "self_attn.q_norm.weight",), IDENTITY,
         lambda s: [(s.head_dim,)]),
    Rule(_M + "self_attention.k_layernorm.weight", (_H + "self_attn.k_norm.weight",), IDENTITY,
         lambda s: [(s.head_dim,)]),
)

# HF tensors that may be present and carry nothing megarl needs (HF ignores them too).
IGNORABLE_SUFFIXES = ("rotary_emb.inv_freq",)


def _ignorable(name: str, shape: ModelShape) -> bool:
    # With tied embeddings HF ignores a saved lm_head and uses the embedding, and so do we.
    return name.endswith(IGNORABLE_SUFFIXES) or (
        shape.tie_word_embeddings and name == OUTPUT_LAYER.hf[0])


class CheckpointAdapter(Protocol):
    """What the converters, the live loaders and the weight export need from a family."""

    family: str

    def hf_shapes(self, shape: ModelShape) -> dict[str, Shape]: ...

    def megatron_shapes(self, dims: Dims) -> dict[str, Shape]: ...

    def check_hf_tensors(self, available: Mapping[str, Shape], shape: ModelShape,
                         where: str) -> None: ...

    def from_hf(self, name: str, read: Callable[[str], torch.Tensor],
                dims: Dims) -> torch.Tensor: ...

    def to_hf(self, name: str, tensor: torch.Tensor,
              dims: Dims) -> list[tuple[str, torch.Tensor]]: ...


class DenseDecoderAdapter:
    """The adapter of a dense decoder family, from its layer rules (module docstring)."""

    def __init__(self, family: str, layer_rules: Sequence[Rule]) -> None:
        self.family = family
        self.layer_rules = tuple(layer_rules)
        # What the name map implies, checked against every shape the adapter is given.
        self.qkv_bias = all(rule in self.layer_rules for rule in QKV_BIAS)
        self.qk_layernorm = all(rule in self.layer_rules for rule in QK_NORM)

    def rules(self, shape: ModelShape) -> dict[str, Rule]:
        """Every concrete rule of a model of `shape`, by canonical Megatron name, in order."""
        return _expand(self, shape)

    def hf_shapes(self, shape: ModelShape) -> dict[str, Shape]:
        """Every HF tensor a checkpoint of `shape` must have, with its shape."""
        out: dict[str, Shape] = {}
        for rule in self.rules(shape).values():
            out.update(zip(rule.hf, (tuple(x) for x in rule.hf_shapes(shape))))
        return out

    def megatron_shapes(self, dims: Dims) -> dict[str, Shape]:
        """Every canonical Megatron parameter of the model, with its full (TP=1) shape."""
        return {name: rule.transform.megatron_shape(rule.hf_shapes(dims.shape), dims)
                for name, rule in self.rules(dims.shape).items()}

    def hf_outputs(self, name: str, shape: ModelShape) -> list[tuple[str, Shape]]:
        """The HF tensors (name, shape) that Megatron parameter `name` holds, in to_hf order."""
        rule = self._rule(name, shape)
        return list(zip(rule.hf, (tuple(s) for s in rule.hf_shapes(shape))))

    def check_hf_tensors(self, available: Mapping[str, Shape], shape: ModelShape,
                         where: str) -> None:
        """Raise unless the HF tensors `available` (name -> shape) are exactly what a model of
        `shape` needs: every tensor present with its shape, nothing unknown."""
        expected = self.hf_shapes(shape)
        missing = [n for n in expected if n not in available]
        wrong = [f"{n} {tuple(available[n])} (config implies {s})"
                 for n, s in expected.items() if n in available and tuple(available[n]) != s]
        unexpected = [n for n in available if n not in expected and not _ignorable(n, shape)]
        problems = [f"{what} ({len(names)}): {', '.join(names[:6])}"
                    + (", ..." if len(names) > 6 else "")
                    for what, names in (("missing", missing), ("wrong shape", wrong),
                                        ("unexpected", unexpected)) if names]
        if problems:
            raise ValueError(
                f"{where}: the weights do not match the config ({self.family}, "
                f"{shape.num_layers} layers, hidden {shape.hidden_size}, vocab "
                f"{shape.vocab_size}, tied embeddings {shape.tie_word_embeddings}):\n  "
                + "\n  ".join(problems)
            )

    def from_hf(self, name: str, read: Callable[[str], torch.Tensor], dims: Dims) -> torch.Tensor:
        """The full Megatron tensor `name`, made of the HF tensors that `read(hf_name)` returns."""
        rule = self._rule(name, dims.shape)
        tensors = [read(hf) for hf in rule.hf]
        for hf, tensor, expected in zip(rule.hf, tensors, rule.hf_shapes(dims.shape)):
            check_shape(hf, tensor, expected)
        dtypes = {t.dtype for t in tensors}
        if len(dtypes) > 1:
            raise ValueError(f"{', '.join(rule.hf)}: mixed dtypes {sorted(map(str, dtypes))}")
        out = rule.transform.from_hf(tensors, dims)
        check_shape(name, out, rule.transform.megatron_shape(rule.hf_shapes(dims.shape), dims))
        return out

    def to_hf(self, name: str, tensor: torch.Tensor, dims: Dims) -> list[tuple[str, torch.Tensor]]:
        """The HF (name, tensor) pairs that the full Megatron tensor `name` holds."""
        rule = self._rule(name, dims.shape)
        check_shape(name, tensor, rule.transform.megatron_shape(rule.hf_shapes(dims.shape), dims))
        out = rule.transform.to_hf(tensor, dims)
        for hf, part, expected in zip(rule.hf, out, rule.hf_shapes(dims.shape)):
            check_shape(hf, part, expected)
        return list(zip(rule.hf, out))

    def _rule(self, name: str, shape: ModelShape) -> Rule:
        rule = self.rules(shape).get(name)
        if rule is None:
            raise KeyError(f"{name} is not a parameter of a {self.family} model of this shape")
        return rule


@functools.lru_cache(maxsize=16)
def _expand(adapter: DenseDecoderAdapter, shape: ModelShape) -> dict[str, Rule]:
    if shape.family != adapter.family:
        raise ValueError(f"a {shape.family} shape given to the {adapter.family} adapter")
    if (shape.qkv_bias, shape.qk_layernorm) != (adapter.qkv_bias, adapter.qk_layernorm):
        raise ValueError(
            f"{adapter.family} models have qkv_bias={adapter.qkv_bias} and qk_layernorm="
            f"{adapter.qk_layernorm}; the shape says {shape.qkv_bias} and {shape.qk_layernorm}"
        )
    rules = [EMBEDDING]
    for i in range(shape.num_layers):
        rules.extend(rule.for_layer(i) for rule in adapter.layer_rules)
    rules.append(FINAL_NORM)
    if not shape.tie_word_embeddings:
        rules.append(OUTPUT_LAYER)
    return {rule.megatron: rule for rule in rules}


ADAPTERS: dict[str, DenseDecoderAdapter] = {
    "qwen2": DenseDecoderAdapter("qwen2", LAYER + QKV_BIAS),
    "qwen3": DenseDecoderAdapter("qwen3", LAYER + QK_NORM),
    "llama": DenseDecoderAdapter("llama", LAYER),
}
"""Registered by Hugging Face `model_type`."""


def adapter_for(family: str) -> DenseDecoderAdapter:
    """The adapter registered for `family` (a Hugging Face model_type)."""
    adapter = ADAPTERS.get(family)
    if adapter is None:
        raise ValueError(f"no checkpoint adapter for model_type {family!r}; megarl converts "
                         f"{', '.join(sorted(ADAPTERS))}")
    return adapter
