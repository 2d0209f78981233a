"""How Megatron GPT parameters are laid out over tensor and pipeline parallelism.

A parameter is named as in a Megatron GPTModel with *global* layer numbers
(`decoder.layers.{i}...`) and has a *full* tensor, the one a TP=1 model holds. This module maps
full tensors to the shard a tensor-parallel rank holds and back, and local layer numbers of a
pipeline stage to global ones. Both the offline converters and the live weight export use it.

Canonical names: transformer-engine fuses the pre-attention norm into `linear_qkv`
(`linear_qkv.layer_norm_weight`) and the pre-MLP norm into `linear_fc1`; Megatron's local spec
keeps them as `input_layernorm` / `pre_mlp_layernorm` but already saves them under the fused
names in distributed checkpoints. megarl uses the fused (transformer-engine) names, with global
layer numbers and without wrapper prefixes, as the one canonical name of a parameter.

Rules (by the parameter's final name; local-spec and transformer-engine names alike):
- column-parallel (split along dim 0): QKV weight and bias, word embeddings, output layer;
- gated column-parallel: `linear_fc1` of a SwiGLU MLP holds [gate; up] and each rank holds
  [gate_r; up_r], so gate and up are split separately;
- row-parallel (split along dim 1): `linear_proj`, `linear_fc2` weights;
- everything else (norms, row-parallel biases) is replicated.
"""

from __future__ import annotations

import re
from enum import Enum

import torch

_LAYER = re.compile(r"^(?P<prefix>(?:.*\.)?decoder\.layers\.)(?P<index>\d+)(?P<rest>\..*)$")


class Split(Enum):
    REPLICATED = "replicated"
    COLUMN = "column"
    GATED_COLUMN = "gated_column"
    ROW = "row"


_COLUMN_SUFFIXES = (
    "self_attention.linear_qkv.weight",
    "self_attention.linear_qkv.bias",
    "embedding.word_embeddings.weight",
    "output_layer.weight",
)
_GATED_SUFFIXES = ("mlp.linear_fc1.weight", "mlp.linear_fc1.bias")
_ROW_SUFFIXES = ("self_attention.linear_proj.weight", "mlp.linear_fc2.weight")


def split_of(name: str) -> Split:
    """How the parameter `name` is split over tensor-parallel ranks."""
    name = strip_wrappers(name)
    if name.endswith(_GATED_SUFFIXES):
        return Split.GATED_COLUMN
    if name.endswith(_COLUMN_SUFFIXES):
        return Split.COLUMN
    if name.endswith(_ROW_SUFFIXES):
        return Split.ROW
    return Split.REPLICATED


def strip_wrappers(name: str) -> str:
    """Drop the `module.` prefixes that DDP and Float16Module wrappers add."""
    while name.startswith("module."):
        name = name[len("module."):]
    return name


def shard(name: str, full: torch.Tensor, tp_rank: int, tp: int) -> torch.Tensor:
    """The part of `full` that tensor-parallel rank `tp_rank` of `tp` holds."""
    split = split_of(name)
    if split is Split.REPLICATED or tp == 1:
        return full
    if split is Split.ROW:
        return _chunk(name, full, 1, tp)[tp_rank]
    if split is Split.COLUMN:
        return _chunk(name, full, 0, tp)[tp_rank]
    gate, up = _chunk(name, full, 0, 2)
    return torch.cat([_chunk(name, gate, 0, tp)[tp_rank], _chunk(name, up, 0, tp)[tp_rank]])


def gather(name: str, shards: list[torch.Tensor]) -> torch.Tensor:
    """The full tensor from every tensor-parallel rank's shard, in rank order."""
    split = split_of(name)
    if split is Split.REPLICATED or len(shards) == 1:
        return shards[0]
    if split is Split.ROW:
        return torch.cat(shards, dim=1)
    if split is Split.COLUMN:
        return torch.cat(shards, dim=0)
    halves = [_chunk(name, s, 0, 2) for s in shards]
    return torch.cat([torch.cat([h[0] for h in halves]), torch.cat([h[1] for h in halves])])


def _chunk(name: str, tensor: torch.Tensor, dim: int, parts: int) -> tuple[torch.Tensor, ...]:
    if tensor.shape[dim] % parts:
        raise ValueError(
            f"{name}: dimension {dim} of shape {tuple(tensor.shape)} does not split into {parts}"
        )
    return torch.chunk(tensor, parts, dim=dim)


def layer_index(name: str) -> int | None:
    """The layer number in `name`, or None for parameters outside the decoder layers."""
    match = _LAYER.match(strip_wrappers(name))
    return int(match["index"]) if match else None


def renumber(name: str, offset: int) -> str:
    """`name` with its layer number shifted by `offset` (local <-> global on a pipeline stage)."""
    match = _LAYER.match(strip_wrappers(name))
    if match is None:
        return strip_wrappers(name)
    return f"{match['prefix']}{int(match['index']) + offset}{match['rest']}"


def layer_offset(chunk: torch.nn.Module) -> int:
    """Global number of the first decoder layer of a (possibly wrapped) GPTModel chunk."""
    layers = unwrap(chunk).decoder.layers
    if len(layers) == 0:
        return 0
    # Megatron's TransformerLayer knows its 1-based global number.
    return layers[0].layer_number - 1


# Local-spec names of the norms that transformer-engine fuses into the following linear layer.
_LOCAL_TO_CANONICAL = {
    "input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
    "pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight",
}


def canonical_name(name: str, offset: int = 0) -> str:
    """The canonical name (module docstring) of parameter `name` of a chunk whose first layer
    has global number `offset`; local-spec and transformer-engine names give the same result."""
    name = renumber(name, offset)
    match = _LAYER.match(name)
    if match is not None and match["rest"][1:] in _LOCAL_TO_CANONICAL:
        return f"{match['prefix']}{match['index']}.{_LOCAL_TO_CANONICAL[match['rest'][1:]]}"
    return name


def checkpoint_key(name: str) -> tuple[str, int | None]:
    """Megatron's distributed-checkpoint key of a canonical name, and its layer number.

    Megatron stacks a parameter of every layer into one global tensor whose first axis is the
    layer (`decoder.layers.3.mlp.linear_fc2.weight` -> `decoder.layers.mlp.linear_fc2.weight`,
    row 3); parameters outside the layers keep their name.
    """
    match = _LAYER.match(name)
    if match is None:
        return name, None
    return f"{match['prefix']}{match['rest'][1:]}", int(match["index"])


def full_shape(name: str, local_shape: tuple[int, ...], tp: int) -> tuple[int, ...]:
    """Shape of the full tensor of which a tensor-parallel rank holds `local_shape`."""
    split = split_of(name)
    shape = list(local_shape)
    if split is Split.ROW:
        shape[1] *= tp
    elif split in (Split.COLUMN, Split.GATED_COLUMN):
        shape[0] *= tp
    return tuple(shape)


def unwrap(chunk: torch.nn.Module) -> torch.nn.Module:
    """The GPTModel inside DDP / Float16Module wrappers."""
    while hasattr(chunk, "module"):
        chunk = chunk.module
    return chunk
