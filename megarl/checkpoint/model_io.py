"""Weights into and out of the live, sharded model chunks of this rank.

- `load_hf_into_model(chunks, hf_dir, ctx)`: Hugging Face safetensors straight into the
  chunks; each rank reads only the HF tensors of its own pipeline stage and keeps its
  tensor-parallel shard.
- `save_megatron_checkpoint(chunks, directory, ctx, shape)` / `load_megatron_checkpoint(...)`:
  the model's weights as a Megatron distributed checkpoint (torch_dist), interchangeable with
  what `tools/convert_hf_to_megatron.py` writes and loadable at any TP/PP.

All three are collective over the trainer ranks (call them on every rank). `chunks` may be
wrapped (DDP, Float16Module): parameters are reached through the wrappers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import torch

from megarl.checkpoint import megatron_layout as layout
from megarl.checkpoint.adapters import DenseDecoderAdapter, adapter_for
from megarl.checkpoint.dist_io import in_process_strategy, stored_object_keys, stored_tensors
from megarl.checkpoint.hf_io import HFCheckpoint
from megarl.checkpoint.manifest import shape_differences, write_manifest
from megarl.checkpoint.output import staged_output
from megarl.checkpoint.transforms import Dims, check_shape
from megarl.models.hf import shape_from_hf_dir
from megarl.models.shape import ModelShape
from megarl.parallel.groups import ParallelContext

EMBEDDING = "embedding.word_embeddings.weight"
OUTPUT_LAYER = "output_layer.weight"


def canonical_parameters(
    chunks: Sequence[torch.nn.Module], shape: ModelShape, *, tied_copy: bool = True,
) -> Iterator[tuple[str, torch.nn.Parameter]]:
    """(canonical name, parameter) of every weight of this rank's chunks.

    With tied embeddings and several pipeline stages, the last stage keeps a copy of the word
    embeddings as its output layer; it is named as the embedding it copies, or left out when
    not `tied_copy`.
    """
    for chunk in chunks:
        offset = layout.layer_offset(chunk)
        for name, param in layout.unwrap(chunk).named_parameters():
            canonical = layout.canonical_name(name, offset)
            if shape.tie_word_embeddings and canonical == OUTPUT_LAYER:
                if not tied_copy:
                    continue
                canonical = EMBEDDING
            yield canonical, param


def padded_vocab_of(chunks: Sequence[torch.nn.Module]) -> int:
    """The padded vocabulary the chunks were built with (GPTModel keeps it)."""
    return int(layout.unwrap(chunks[0]).vocab_size)


def open_hf_checkpoint(hf_dir: str | Path,
                       shape: ModelShape) -> tuple[DenseDecoderAdapter, HFCheckpoint]:
    """The family's adapter and the indexed safetensors of `hf_dir`, checked to hold exactly
    the tensors a model of `shape` needs (before any tensor is read)."""
    adapter = adapter_for(shape.family)
    checkpoint = HFCheckpoint(hf_dir)
    adapter.check_hf_tensors({n: i.shape for n, i in checkpoint.tensors.items()}, shape,
                             str(hf_dir))
    return adapter, checkpoint


def load_hf_into_model(
    chunks: Sequence[torch.nn.Module], hf_dir: str | Path, ctx: ParallelContext,
    shape: Optional[ModelShape] = None,
) -> ModelShape:
    """Copy the Hugging Face weights in `hf_dir` into this rank's chunks; returns the shape.

    `shape`, when given, must be the one the chunks were built from; it is checked against
    the directory's config.json.
    """
    hf_shape, _ = shape_from_hf_dir(hf_dir)
    if shape is not None and shape != hf_shape:
        raise ValueError(f"{hf_dir}/config.json does not describe the model that was built: "
                         + "; ".join(shape_differences(hf_shape, shape)))
    adapter, checkpoint = open_hf_checkpoint(hf_dir, hf_shape)
    dims = Dims(hf_shape, padded_vocab_of(chunks))
    with torch.no_grad():
        for name, param in canonical_parameters(chunks, hf_shape):
            full = adapter.from_hf(name, checkpoint.read, dims)
            local = layout.shard(name, full, ctx.tp_rank, ctx.tp)
            check_shape(f"{name} (tp rank {ctx.tp_rank})", local, param.shape)
            param.data.copy_(local)
    return hf_shape


def model_sharded_state_dict(chunks: Sequence[torch.nn.Module]) -> dict[str, Any]:
    """Megatron's sharded state dict of the chunks, one entry per chunk (`model0`, ...).

    The sharded keys are global (layer offsets included), so the checkpoint does not depend on
    how the chunks are split; the actor can add optimizer state next to these entries.
    """
    return {f"model{i}": layout.unwrap(c).sharded_state_dict() for i, c in enumerate(chunks)}


def save_megatron_checkpoint(
    chunks: Sequence[torch.nn.Module], directory: str | Path, ctx: ParallelContext,
    shape: ModelShape, *, hf_config: Optional[dict] = None, overwrite: bool = False,
) -> Path:
    """Save the chunks' weights as a torch_dist checkpoint in `directory` (complete or absent)."""
    from megatron.core import dist_checkpointing

    state = model_sharded_state_dict(chunks)
    with staged_output(directory, overwrite, distributed=True) as staging:
        dist_checkpointing.save(state, str(staging), sharded_strategy=in_process_strategy())
        if ctx.rank == 0:
            write_manifest(staging, shape, padded_vocab=padded_vocab_of(chunks),
                           hf_config=hf_config, written_by="save_megatron_checkpoint",
                           layout={"tp": ctx.tp, "pp": ctx.pp, "vpp": ctx.vpp})
    return Path(directory)


def load_megatron_checkpoint(
    chunks: Sequence[torch.nn.Module], directory: str | Path, ctx: ParallelContext,
) -> None:
    """Load the weights of a torch_dist checkpoint (any TP/PP it was written at) into the chunks.

    The vocabulary may have been padded differently: Megatron reads the rows both have, and
    padding rows the checkpoint lacks stay zero.
    """
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    stored, objects = stored_tensors(directory), stored_object_keys(directory)
    state = model_sharded_state_dict(chunks)
    # `_extra_state` objects exist in transformer-engine and local layers alike but are saved
    # only by some writers; those the checkpoint lacks are left at their (empty) defaults.
    absent: dict[str, list[str]] = {}
    for i, chunk_state in state.items():
        for name, value in list(chunk_state.items()):
            if isinstance(value, ShardedObject):
                if value.key not in objects:
                    absent.setdefault(i, []).append(name)
                    del chunk_state[name]
            elif getattr(value, "key", None) is not None and value.key not in stored:
                raise KeyError(f"{directory}: the checkpoint has no tensor {value.key}")
    loaded = dist_checkpointing.load(state, str(directory))
    for i, chunk in enumerate(chunks):
        chunk_state = loaded[f"model{i}"]
        for name in absent.get(f"model{i}", []):
            chunk_state[name] = None
        layout.unwrap(chunk).load_state_dict(chunk_state, strict=True)
