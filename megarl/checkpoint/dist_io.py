"""Megatron distributed checkpoints (torch_dist format) written and read a few tensors at a time.

A torch_dist checkpoint stores every parameter as one global tensor under Megatron's key
(`megatron_layout.checkpoint_key`): the parameters of all layers stacked along a first axis,
at TP=1 layout, so that any TP/PP layout can load it. One `dist_checkpointing.save` call needs
all of its tensors in memory at once, so `StreamingCheckpointWriter` saves one *unit* at a
time (e.g. one layer: a slice of every stacked tensor) into a folder of its own, each rank
its own units, and `finish()` moves the data files up and merges the units' torch.distributed
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
import warnings
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


def in_process_strategy(collective: bool = True):
    """A save strategy for Megatron's torch_dist format that writes from this process.

    Megatron's own torch_dist writer hands the data to forked writer processes and starts a
    spawn-method manager process; that fails in daemonic processes (worker pools, test
    harnesses) and doubles the processes a converter runs. This one groups the main replicas
    by key exactly as Megatron's does, translates them with Megatron's own function, and lets
    torch.distributed.checkpoint write them in-process, so the files are the same format
    (`metadata.json` says torch_dist, version 1) and Megatron's loader reads them.

    Not `collective`: this rank saves alone (no plan exchange), which is how the streaming
    writer saves a unit that covers only part of each global tensor.
    """
    from collections import defaultdict

    import torch.distributed.checkpoint as dcp
    from megatron.core.dist_checkpointing.mapping import ShardedObject, is_main_replica
    from megatron.core.dist_checkpointing.strategies.base import SaveShardedStrategy
    from megatron.core.dist_checkpointing.strategies.torch import (
        MCoreSavePlanner, flatten_state_dict, mcore_to_pyt_state_dict,
    )

    class InProcessTorchDistSave(SaveShardedStrategy):
        @property
        def can_handle_sharded_objects(self) -> bool:
            return True

        def save(self, sharded_state_dict, checkpoint_dir) -> None:
            flat, _ = flatten_state_dict(sharded_state_dict)
            by_key = defaultdict(list)
            for item in flat.values():
                if is_main_replica(item.replica_id):
                    key = item.unique_key if isinstance(item, ShardedObject) else item.key
                    by_key[key].append(item)
            dcp.save(mcore_to_pyt_state_dict(dict(by_key), False),
                     storage_writer=dcp.FileSystemWriter(str(checkpoint_dir), thread_count=1),
                     planner=MCoreSavePlanner(dedup_replicated_tensors=False,
                                              flatten_state_dict=False),
                     no_dist=not collective)

    return InProcessTorchDistSave("torch_dist", 1)


# Tensors outside the layers (embedding, output layer) are stored in this many row blocks when
# their rows divide evenly: a reader then holds one block, not a second copy of the whole.
ROW_BLOCKS = 8


def sharded_tensors(name: str, full: torch.Tensor, num_layers: int) -> dict:
    """The ShardedTensors (by state-dict key) that store the full tensor of parameter `name`."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    key, layer = layout.checkpoint_key(name)
    if layer is None:
        blocks = ROW_BLOCKS if full.dim() == 2 and full.shape[0] % ROW_BLOCKS == 0 else 1
        return {f"{name}.rows{i}": ShardedTensor.from_rank_offsets(
                    key, block, (0, i, blocks), replica_id=0)
                for i, block in enumerate(torch.chunk(full, blocks))}
    if not 0 <= layer < num_layers:
        raise ValueError(f"{name}: layer {layer} outside a model of {num_layers} layers")
    return {name: ShardedTensor.from_rank_offsets(key, full.unsqueeze(0), (0, layer, num_layers),
                                                  replica_id=0)}


def extra_state_objects(layer: int, num_layers: int) -> dict:
    """The `_extra_state` objects of one layer, as a Megatron model at TP=1 saves them."""
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    return {
        f"decoder.layers.{layer}.{module}._extra_state": ShardedObject(
            f"decoder.layers.{module}._extra_state", None, (num_layers,), (layer,), replica_id=0)
        for module in EXTRA_STATE_MODULES
    }


class StreamingCheckpointWriter:
    """Writes a torch_dist checkpoint into `directory` one unit at a time (module docstring).

    Each rank writes its units independently (`write_unit`, no collectives); `finish` is
    collective over the default group: rank 0 merges what every rank wrote.
    """

    def __init__(self, directory: str | Path) -> None:
        self.dir = Path(directory)
        self.units = 0

    def write_unit(self, state: dict) -> None:
        """Save ShardedTensors/ShardedObjects (by any key) that no other unit holds."""
        unit_dir = self.dir / "units" / f"{dist.get_rank():05d}-{self.units:05d}"
        unit_dir.mkdir(parents=True)
        with warnings.catch_warnings():
            # Saving alone is the point here; torch warns that it assumes so.
            warnings.filterwarnings("ignore", message=".*save in a single process")
            in_process_strategy(collective=False).save(state, unit_dir)
        self.units += 1

    def finish(self) -> None:
        """Merge every rank's units into one checkpoint (rank 0 does the file work)."""
        from megatron.core.dist_checkpointing.core import CheckpointingConfig, save_config
        from megatron.core.dist_checkpointing.serialization import (
            get_default_save_common_strategy,
        )

        dist.barrier()
        if dist.get_rank() == 0:
            _merge_units(self.dir, sorted((self.dir / "units").iterdir()))
            get_default_save_common_strategy().save_common({}, self.dir)
            save_config(CheckpointingConfig("torch_dist", 1), str(self.dir))
        dist.barrier()


def _merge_units(directory: Path, unit_dirs: list[Path]) -> None:
    from torch.distributed.checkpoint import FileSystemReader

    if not unit_dirs:
        raise ValueError("nothing was written")
    merged = None
    for unit_dir in unit_dirs:
        metadata = FileSystemReader(str(unit_dir)).read_metadata()
        renamed = {}
        for info in metadata.storage_data.values():
            if info.relative_path not in renamed:
                renamed[info.relative_path] = f"u{unit_dir.name}{info.relative_path}"
                os.replace(unit_dir / info.relative_path,
                           directory / renamed[info.relative_path])
        metadata.storage_data = {
            index: dataclasses.replace(info, relative_path=renamed[info.relative_path])
            for index, info in metadata.storage_data.items()
        }
        merged = metadata if merged is None else _merge_metadata(merged, metadata)
    _check_coverage(merged)
    with open(directory / _METADATA, "wb") as f:
        pickle.dump(merged, f)
    shutil.rmtree(directory / "units")


def _merge_metadata(into, other):
    for key, meta in other.state_dict_metadata.items():
        mine = into.state_dict_metadata.get(key)
        if mine is None:
            into.state_dict_metadata[key] = meta
            continue
        if not hasattr(meta, "chunks"):
            raise ValueError(f"object {key} written by two units")
        if (mine.size, mine.properties.dtype) != (meta.size, meta.properties.dtype):
            raise ValueError(f"{key}: units disagree on shape or dtype "
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
