"""Streaming export of a live, sharded Megatron model as Hugging Face (name, tensor) pairs.

Used by weight sync after every optimizer step:

    for bucket in bucket_by_bytes(export_hf_weights(chunks, shape, ctx), max_bytes):
        ...  # only global rank 0 gets buckets; every other rank gets none

Rank semantics. Every trainer rank calls `export_hf_weights` and runs the generator to its
end (it is collective). Only the *exporting rank*, global rank 0 (pipeline stage 0, TP rank 0,
data- and context-parallel rank 0), receives tensors; on every other rank the generator yields
nothing. Within the first data-parallel replica (dp_rank 0, cp_rank 0):
- each stage all-gathers every parameter over its tensor-parallel group, one at a time;
- the TP rank 0 of stage s > 0 sends the full tensor to global rank 0 over the pipeline group
  (point-to-point, stage by stage in order), so every stage's weights reach rank 0;
- global rank 0 turns each full tensor into HF tensors (QKV split, gate/up split, vocabulary
  padding removed) and yields them.
Other data/context-parallel replicas hold identical weights and take no part.

Tensors are yielded in the model's parameter dtype, one Megatron parameter at a time, so rank
0 holds about one full parameter beyond its own shard. A yielded tensor may share memory with
a parameter (TP=1, stage 0): consume or copy it before the next optimizer step.
"""

from __future__ import annotations

from typing import Iterable, Iterator, Sequence

import torch
import torch.distributed as dist

from megarl.checkpoint import megatron_layout as layout
from megarl.checkpoint.adapters import adapter_for
from megarl.checkpoint.model_io import canonical_parameters, padded_vocab_of
from megarl.checkpoint.transforms import Dims
from megarl.models.shape import ModelShape
from megarl.parallel.groups import ParallelContext

EXPORTING_RANK = 0


def export_hf_weights(
    chunks: Sequence[torch.nn.Module], shape: ModelShape, ctx: ParallelContext,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (hf_name, full tensor) for every HF parameter on global rank 0 (module docstring)."""
    if ctx.dp_rank != 0 or ctx.cp_rank != 0:
        return
    adapter = adapter_for(shape.family)
    dims = Dims(shape, padded_vocab_of(chunks))
    # The last stage's copy of tied embeddings is not exported: stage 0 has the original.
    local = list(canonical_parameters(chunks, shape, tied_copy=False))
    on_export_path = ctx.tp_rank == 0
    catalog = _exchange_catalog(local, ctx) if on_export_path and ctx.pp > 1 else None
    stage_ranks = dist.get_process_group_ranks(ctx.pp_group) if catalog is not None else None
    for stage in range(ctx.pp):
        if stage == ctx.pp_rank:
            for name, param in local:
                full = _gather_tp(name, param, ctx)
                if ctx.rank == EXPORTING_RANK:
                    yield from adapter.to_hf(name, full, dims)
                elif on_export_path:
                    dist.send(full.contiguous(), dst=EXPORTING_RANK, group=ctx.pp_group)
        elif ctx.rank == EXPORTING_RANK:
            for name, full_shape, dtype in catalog[stage]:
                full = torch.empty(full_shape, dtype=dtype, device=ctx.device)
                dist.recv(full, src=stage_ranks[stage], group=ctx.pp_group)
                yield from adapter.to_hf(name, full, dims)


def export_hf_weights_everywhere(
    chunks: Sequence[torch.nn.Module], shape: ModelShape, ctx: ParallelContext,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield every (hf_name, full tensor) on *every* trainer rank, for colocated weight sync,
    where each rank hands its own GPU copy to the server rank sharing its GPU.

    Collective over all trainer ranks. Each stage all-gathers a parameter over its TP group,
    then broadcasts it over the pipeline group, so every rank of every data-parallel replica
    ends up with the same tensors in the same order; a rank holds about one full parameter
    beyond its shard at a time.
    """
    adapter = adapter_for(shape.family)
    dims = Dims(shape, padded_vocab_of(chunks))
    local = list(canonical_parameters(chunks, shape, tied_copy=False))
    catalog = _exchange_catalog(local, ctx) if ctx.pp > 1 else None
    stage_ranks = dist.get_process_group_ranks(ctx.pp_group) if ctx.pp > 1 else None
    for stage in range(ctx.pp):
        if stage == ctx.pp_rank:
            for name, param in local:
                full = _gather_tp(name, param, ctx).contiguous()
                if ctx.pp > 1:
                    dist.broadcast(full, src=stage_ranks[stage], group=ctx.pp_group)
                yield from adapter.to_hf(name, full, dims)
        else:
            for name, full_shape, dtype in catalog[stage]:
                full = torch.empty(full_shape, dtype=dtype, device=ctx.device)
                dist.broadcast(full, src=stage_ranks[stage], group=ctx.pp_group)
                yield from adapter.to_hf(name, full, dims)


def _exchange_catalog(local, ctx: ParallelContext) -> list[list[tuple]]:
    """(name, full shape, dtype) of every stage's parameters, for the exporting rank's receives."""
    mine = [(name, layout.full_shape(name, tuple(p.shape), ctx.tp), p.dtype) for name, p in local]
    catalog: list = [None] * ctx.pp
    dist.all_gather_object(catalog, mine, group=ctx.pp_group)
    return catalog


def _gather_tp(name: str, param: torch.nn.Parameter, ctx: ParallelContext) -> torch.Tensor:
    data = param.detach()
    if ctx.tp == 1:
        return data
    shards = [torch.empty_like(data) for _ in range(ctx.tp)]
    dist.all_gather(shards, data.contiguous(), group=ctx.tp_group)
    return layout.gather(name, shards)


def bucket_by_bytes(
    pairs: Iterable[tuple[str, torch.Tensor]], max_bytes: int,
) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Group (name, tensor) pairs, in order, into lists of at most `max_bytes` bytes.

    A tensor larger than `max_bytes` forms a bucket of its own. Iterating the result drives
    the source to its end, so collective sources (the export) work on every rank.
    """
    if max_bytes <= 0:
        raise ValueError(f"max_bytes must be positive, got {max_bytes}")
    bucket: list[tuple[str, torch.Tensor]] = []
    size = 0
    for name, tensor in pairs:
        nbytes = tensor.numel() * tensor.element_size()
        if bucket and size + nbytes > max_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.append((name, tensor))
        size += nbytes
    if bucket:
        yield bucket
