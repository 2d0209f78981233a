"""Small pure layout transforms between Hugging Face tensors and Megatron's full tensors.

Each transform turns the HF tensors one Megatron parameter is made of into that parameter
(`from_hf`) and back (`to_hf`), and checks every shape on the way. They only move bytes
(concatenate, reorder, pad, slice), so a round trip is bit-identical.

Layouts (rows = dim 0):
- QKV: HF has q_proj [heads*d, h], k_proj and v_proj [groups*d, h]. Megatron's `linear_qkv`
  holds, for each query group in turn, that group's query heads, then its key head, then its
  value head: [g0: q q .. k v | g1: q q .. k v | ...]. Tensor parallelism then gives each rank a
  contiguous run of whole groups. Biases follow the same row order.
- Gate/up: Megatron's `linear_fc1` is [gate; up] (HF gate_proj then up_proj).
- Vocabulary: Megatron's embedding and output layer have rows for a vocabulary padded for
  tensor parallelism; padding rows are zero on the way in and dropped on the way out.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from megarl.models.shape import ModelShape

Shape = tuple[int, ...]


@dataclass(frozen=True)
class Dims:
    """What the transforms need to know about the model."""

    shape: ModelShape
    padded_vocab: int


def check_shape(what: str, tensor: torch.Tensor, expected: Sequence[int]) -> None:
    """Raise a ValueError naming `what` unless `tensor` has shape `expected`."""
    if tuple(tensor.shape) != tuple(expected):
        raise ValueError(
            f"{what}: shape {tuple(tensor.shape)} does not match the model config, which "
            f"implies {tuple(expected)}"
        )


class Identity:
    """One HF tensor is the Megatron tensor."""

    def megatron_shape(self, hf_shapes: Sequence[Shape], dims: Dims) -> Shape:
        (shape,) = hf_shapes
        return shape

    def from_hf(self, tensors: Sequence[torch.Tensor], dims: Dims) -> torch.Tensor:
        (tensor,) = tensors
        return tensor

    def to_hf(self, tensor: torch.Tensor, dims: Dims) -> list[torch.Tensor]:
        return [tensor]


class FusedQKV:
    """q, k, v projections (weights or biases) <-> Megatron's per-group interleaved linear_qkv."""

    def megatron_shape(self, hf_shapes: Sequence[Shape], dims: Dims) -> Shape:
        q, k, v = hf_shapes
        return (q[0] + k[0] + v[0], *q[1:])

    def from_hf(self, tensors: Sequence[torch.Tensor], dims: Dims) -> torch.Tensor:
        q, k, v = tensors
        s = dims.shape
        groups, per_group = s.num_query_groups, s.num_attention_heads // s.num_query_groups
        rest = q.shape[1:]
        parts = [
            q.reshape(groups, per_group * s.head_dim, *rest),
            k.reshape(groups, s.head_dim, *rest),
            v.reshape(groups, s.head_dim, *rest),
        ]
        return torch.cat(parts, dim=1).reshape(-1, *rest)

    def to_hf(self, tensor: torch.Tensor, dims: Dims) -> list[torch.Tensor]:
        s = dims.shape
        groups, per_group = s.num_query_groups, s.num_attention_heads // s.num_query_groups
        rest = tensor.shape[1:]
        grouped = tensor.reshape(groups, (per_group + 2) * s.head_dim, *rest)
        q, k, v = torch.split(grouped, [per_group * s.head_dim, s.head_dim, s.head_dim], dim=1)
        return [x.reshape(-1, *rest).contiguous() for x in (q, k, v)]


class GateUp:
    """gate_proj and up_proj <-> Megatron's linear_fc1 = [gate; up]."""

    def megatron_shape(self, hf_shapes: Sequence[Shape], dims: Dims) -> Shape:
        gate, up = hf_shapes
        return (gate[0] + up[0], *gate[1:])

    def from_hf(self, tensors: Sequence[torch.Tensor], dims: Dims) -> torch.Tensor:
        return torch.cat(list(tensors), dim=0)

    def to_hf(self, tensor: torch.Tensor, dims: Dims) -> list[torch.Tensor]:
        gate, up = torch.chunk(tensor, 2, dim=0)
        return [gate.contiguous(), up.contiguous()]


class PaddedVocab:
    """An [vocab, hidden] HF matrix <-> Megatron's [padded_vocab, hidden] (zero padding rows)."""

    def megatron_shape(self, hf_shapes: Sequence[Shape], dims: Dims) -> Shape:
        (shape,) = hf_shapes
        return (dims.padded_vocab, *shape[1:])

    def from_hf(self, tensors: Sequence[torch.Tensor], dims: Dims) -> torch.Tensor:
        (tensor,) = tensors
        extra = dims.padded_vocab - tensor.shape[0]
        assert extra >= 0, "padded vocabulary smaller than the real one"
        if extra == 0:
            return tensor
        padding = tensor.new_zeros((extra, *tensor.shape[1:]))
        return torch.cat([tensor, padding], dim=0)

    def to_hf(self, tensor: torch.Tensor, dims: Dims) -> list[torch.Tensor]:
        return [tensor[: dims.shape.vocab_size].contiguous()]


IDENTITY = Identity()
FUSED_QKV = FusedQKV()
GATE_UP = GateUp()
PADDED_VOCAB = PaddedVocab()
