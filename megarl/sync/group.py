"""The weight-update process group between trainer rank 0 and the generation servers.

SGLang's servers create this group with a TCP rendezvous at (master_address, master_port),
a store prefixed with the group name, and torch's own group constructor; the trainer side must
create it the same way to meet them. This module does that for both sides of megarl (trainer
rank 0 and the CPU dev server), without touching the default process group of the process:
the group lives next to the trainer's torchrun world, and the trainer's world is unaware of it.

Rank 0 is trainer global rank 0 and hosts the store; server TP rank r of a server whose
`rank_offset` is k joins as rank k + r. Only trainer rank 0 is a member, so the other trainer
ranks never block on it.

`torch.distributed.distributed_c10d._new_process_group_helper` is private; it is the call
SGLang uses, and its signature is checked here so that a torch upgrade fails loudly.
"""

from __future__ import annotations

import datetime
import inspect
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed import distributed_c10d as c10d

_HELPER_ARGS = ("group_size", "group_rank", "global_ranks_in_group", "backend", "store",
                "group_name", "timeout")


def _check_torch() -> None:
    params = inspect.signature(c10d._new_process_group_helper).parameters
    missing = [a for a in _HELPER_ARGS if a not in params]
    if missing:
        raise RuntimeError(
            f"torch {torch.__version__}: torch.distributed's _new_process_group_helper lacks "
            f"{missing}; megarl's weight-update group (megarl/sync/group.py) needs updating"
        )


def create_weight_update_group(*, master_address: str, master_port: int, rank: int,
                               world_size: int, group_name: str, backend: str,
                               timeout_s: float) -> Any:
    """Join (rank > 0) or host (rank 0) the weight-update group; blocks until all have joined.

    Collectives on the returned group take it explicitly (`group=`) and name the source by its
    rank inside the group (`group_src=0`).
    """
    _check_torch()
    if backend == "nccl" and not torch.cuda.is_available():
        raise RuntimeError("weight-update group: backend nccl needs CUDA; use gloo on CPU")
    timeout = datetime.timedelta(seconds=timeout_s)
    # An explicit store rather than c10d.rendezvous: under torchrun the latter honours
    # TORCHELASTIC_USE_AGENT_STORE and joins the trainer job's own store as a client, so
    # trainer rank 0 would never host this group's rendezvous.
    store = dist.TCPStore(master_address, master_port, world_size, is_master=rank == 0,
                          timeout=timeout, wait_for_workers=False)
    store = c10d.PrefixStore(group_name, store)
    group, _ = c10d._new_process_group_helper(
        world_size, rank, [], c10d.Backend(backend), store, group_name=group_name,
        timeout=timeout,
    )
    # collectives translate group ranks through this map; the group's ranks are its own
    c10d._world.pg_group_ranks[group] = {i: i for i in range(world_size)}
    return group


def destroy_weight_update_group(group: Any) -> None:
    """Tear the group down (safe to call on a group whose peers are gone)."""
    if group is None:
        return
    dist.destroy_process_group(group)
