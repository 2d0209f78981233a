"""Megatron distributed checkpoints (torch_dist format) written and read a few tensors at a time.

A torch_dist checkpoint stores every parameter as one global tensor under Megatron's key
(`megatron_layout.checkpoint_key`): the parameters of all layers stacked along a first axis,
at TP=1 layout, so that any TP/PP layout can load it. One `dist_checkpointing.save` call needs
all of its tensors in memory at once, so `StreamingCheckpointWriter` saves one *round* at a
time (each rank contributes the tensors of its current unit, e.g. one layer) into a staging
folder, and `finish()` moves the data files up and merges the rounds' torch.distributed
checkpoint metadata into the single `.metadata` that Megatron's loader reads. The merge checks
that every global tensor is covered exactly once.

`read_tensors` reads chosen parameters (whole, TP=1 layout) back, also a few at a time.
Both need torch.distributed to be initialised (one process is enough).
"""

from __future__ import annotations

import dataclasses
import math
import os
import pickle
import shutil
from pathlib import Path
from typing import Iterable

import torch
import torch.distributed as dist

from megarl.checkpoint import megatron_layout as layout

# Layer modules whose (empty, on the local spec) `_extra_state` Megatron saves as objects;
# Megatron's loader expects them, and transformer-engine keeps its FP8 metadata there.
EXTRA_STATE_MODULES = (
    "self_attention.linear_proj", "self_attention.linear_qkv", "mlp.linear_fc1", "mlp.linear_fc2",
)
_METADATA = ".metadata"
_MEGATRON_FILES = ("metadata.json", "common.pt")


def sharded_tensor(name: str, full: torch.Tensor, num_layers: int):
    """The ShardedTensor that stores the full tensor of canonical parameter `name`."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    key, layer = layout.checkpoint_key(name)
    if layer is None:
        return ShardedTensor.from_rank_offsets(key, full, replica_id=0)
    if not 0 <= layer < num_layers:
        raise ValueError(f"{name}: layer {layer} outside a model of {num_layers} layers")
    return ShardedTensor.from_rank_offsets(key, full.unsqueeze(0), (0, layer, num_layers),
                                           replica_id=0)


def extra_state_objects(layer: int, num_layers: int) -> dict:
    """The `_extra_state` objects of one layer, as a Megatron model at TP=1 saves them."""
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    return {
        f"decoder.layers.{layer}.{module}._extra_state": ShardedObject(
            f"decoder.layers.{module}._extra_state", None, (num_layers,), (layer,), replica_id=0)
        for module in EXTRA_STATE_MODULES
    }


class StreamingCheckpointWriter:
    """Writes a torch_dist checkpoint into `directory` in rounds (module docstring).

    Collective over `torch.distributed`'s default group: every rank calls `write_round` the
    same number of times (with its own, possibly empty, state dict) and then `finish`.
    """

    def __init__(self, directory: str | Path) -> None:
        self.dir = Path(directory)
        self.rounds = 0
        self._strategy = None

    def write_round(self, state: dict) -> None:
        """Save this rank's share of the next round (ShardedTensors/ShardedObjects by any key)."""
        from megatron.core import dist_checkpointing
        from megatron.core.dist_checkpointing.strategies.torch import (
            TorchDistSaveShardedStrategy,
        )

        if self._strategy is None:
            # One writer thread: fewer files, and the data is streamed in rounds anyway.
            self._strategy = TorchDistSaveShardedStrategy("torch_dist", 1, thread_count=1)
        round_dir = self._round_dir(self.rounds)
        if dist.get_rank() == 0:
            round_dir.mkdir(parents=True)
        dist.barrier()
        dist_checkpointing.save(state, str(round_dir), sharded_strategy=self._strategy,
                                validate_access_integrity=False)
        self.rounds += 1

    def finish(self) -> None:
        """Merge the rounds into one checkpoint (rank 0 does the file work)."""
        dist.barrier()
        if dist.get_rank() == 0:
            _merge_rounds(self.dir, [self._round_dir(i) for i in range(self.rounds)])
        dist.barrier()

    def _round_dir(self, i: int) -> Path:
        return self.dir / "rounds" / f"{i:05d}"


def _merge_rounds(directory: Path, round_dirs: list[Path]) -> None:
    from torch.distributed.checkpoint import FileSystemReader

    if not round_dirs:
        raise ValueError("nothing was written")
    merged = None
    for i, round_dir in enumerate(round_dirs):
        metadata = FileSystemReader(str(round_dir)).read_metadata()
        renamed = {}
        for info in metadata.storage_data.values():
            if info.relative_path not in renamed:
                renamed[info.relative_path] = f"r{i:05d}{info.relative_path}"
                os.replace(round_dir / info.relative_path,
                           directory / renamed[info.relative_path])
        metadata.storage_data = {
            index: dataclasses.replace(info, relative_path=renamed[info.relative_path])
            for index, info in metadata.storage_data.items()
        }
        merged = metadata if merged is None else _merge_metadata(merged, metadata)
    _check_coverage(merged)
    for name in _MEGATRON_FILES:  # identical in every round; Megatron's loader reads them
        os.replace(round_dirs[0] / name, directory / name)
    with open(directory / _METADATA, "wb") as f:
        pickle.dump(merged, f)
    shutil.rmtree(directory / "rounds")


def _merge_metadata(into, other):
    for key, meta in other.state_dict_metadata.items():
        mine = into.state_dict_metadata.get(key)
        if mine is None:
            into.state_dict_metadata[key] = meta
            continue
        if not hasattr(meta, "chunks"):
            raise ValueError(f"object {key} written in two rounds")
        if (mine.size, mine.properties.dtype) != (meta.size, meta.properties.dtype):
            raise ValueError(f"{key}: rounds disagree on shape or dtype "
                             f"({tuple(mine.size)} {mine.properties.dtype} vs "
                             f"{tuple(meta.size)} {meta.properties.dtype})")
        mine.chunks.extend(meta.chunks)
    into.storage_data.update(other.storage_data)
    extra = getattr(other, "mcore_data", None)
    if extra:
        into.mcore_data = {**(getattr(into, "mcore_data", None) or {}), **extra}
    return into


def _check_coverage(metadata) -> None:
    """Every global tensor is covered by its chunks exactly once (no gaps, no overlaps)."""
    for key, meta in metadata.state_dict_metadata.items():
        if not hasattr(meta, "chunks"):
            continue
        covered = sum(math.prod(c.sizes) for c in meta.chunks)
        offsets = {tuple(c.offsets) for c in meta.chunks}
        inside = all(all(o + s <= n for o, s, n in zip(c.offsets, c.sizes, meta.size))
                     for c in meta.chunks)
        if covered != math.prod(meta.size) or len(offsets) != len(meta.chunks) or not inside:
            raise ValueError(f"{key}: the written chunks do not cover shape {tuple(meta.size)} "
                             "exactly once")


def stored_tensors(directory: str | Path) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Global shape and dtype of every tensor key of a torch_dist checkpoint."""
    from torch.distributed.checkpoint import FileSystemReader

    path = Path(directory)
    if not (path / _METADATA).is_file() or not (path / "metadata.json").is_file():
        raise FileNotFoundError(f"{path}: not a Megatron torch_dist checkpoint (no {_METADATA} "
                                "or metadata.json)")
    metadata = FileSystemReader(str(path)).read_metadata()
    return {key: (tuple(meta.size), meta.properties.dtype)
            for key, meta in metadata.state_dict_metadata.items() if hasattr(meta, "chunks")}


def stored_object_keys(directory: str | Path) -> set[str]:
    """Keys of the ShardedObjects (e.g. `_extra_state`) a torch_dist checkpoint holds."""
    from torch.distributed.checkpoint import FileSystemReader

    metadata = FileSystemReader(str(directory)).read_metadata()
    # Megatron stores each object shard as bytes under `<key>/shard_<offset>_<shape>`.
    return {key.rsplit("/shard_", 1)[0] for key, meta in metadata.state_dict_metadata.items()
            if not hasattr(meta, "chunks")}


def read_tensors(directory: str | Path, names: Iterable[str],
                 stored: dict[str, tuple[tuple[int, ...], torch.dtype]]) -> dict[str, torch.Tensor]:
    """Full (TP=1) tensors of the canonical parameters `names`, in their stored dtype.

    `stored` is `stored_tensors(directory)`. Collective: every rank of the default group calls
    it (with the same or different names).
    """
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    request = {}
    for name in names:
        key, layer = layout.checkpoint_key(name)
        if key not in stored:
            raise KeyError(f"{directory}: the checkpoint has no tensor {key} (for {name})")
        size, dtype = stored[key]
        if layer is None:
            request[name] = ShardedTensor.from_rank_offsets(key, torch.empty(size, dtype=dtype),
                                                            replica_id=0)
        else:
            data = torch.empty((1, *size[1:]), dtype=dtype)
            request[name] = ShardedTensor.from_rank_offsets(key, data, (0, layer, size[0]),
                                                            replica_id=0)
    loaded = dist_checkpointing.load(request, str(directory), validate_access_integrity=False)
    return {name: loaded[name].squeeze(0) if layout.checkpoint_key(name)[1] is not None
            else loaded[name] for name in request}
