"""Process groups of the trainer, built from the `torchrun`/`srun` environment.

`init_distributed` starts torch.distributed (nccl on GPU, gloo on CPU), builds Megatron's
tensor, pipeline (and virtual pipeline), context, expert and data parallel groups, seeds
Megatron's RNG tracker, and returns a `ParallelContext` that is passed explicitly to whatever
needs a group (style: no hidden global lookups outside this module).
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from megarl import platform
from megarl.config import ParallelConfig
from megarl.models.shape import ModelShape
from megarl.parallel.topology import check_topology


@dataclass(frozen=True)
class LaunchEnv:
    rank: int
    world_size: int
    local_rank: int


def launch_env() -> LaunchEnv:
    """Rank, world size and local rank from torchrun's or Slurm's variables (1 process if none)."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return LaunchEnv(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)))
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        return LaunchEnv(
            int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0))
        )
    return LaunchEnv(0, 1, 0)


@dataclass(frozen=True)
class ParallelContext:
    """Sizes, ranks and groups of this trainer process."""

    rank: int
    world_size: int
    local_rank: int
    tp: int
    pp: int
    cp: int
    dp: int
    vpp: int | None
    tp_rank: int
    pp_rank: int
    cp_rank: int
    dp_rank: int
    tp_group: Any
    pp_group: Any
    cp_group: Any
    dp_group: Any
    """Data-parallel group without context parallelism (ranks holding different data)."""
    dp_cp_group: Any
    """Data x context parallel group: where gradients are reduced."""
    mp_group: Any
    """Model-parallel group (tp x pp): the ranks that together hold one replica."""
    device: torch.device

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1

    @property
    def is_logging_rank(self) -> bool:
        """The rank that writes logs, metrics and talks to the rollout servers."""
        return self.rank == 0


def init_distributed(
    parallel: ParallelConfig, shape: ModelShape | None = None, *, seed: int = 0,
    vocab_divisible_by: int = 128,
) -> ParallelContext:
    """Start (or join an already started) torch.distributed and build Megatron's groups."""
    env = launch_env()
    world = dist.get_world_size() if dist.is_initialized() else env.world_size
    check_topology(parallel, world, shape, vocab_divisible_by)
    platform.apply()
    if platform.has_cuda():
        torch.cuda.set_device(env.local_rank % torch.cuda.device_count())
    if not dist.is_initialized():
        for var in ("MASTER_ADDR", "MASTER_PORT"):
            if env.world_size > 1 and var not in os.environ:
                raise RuntimeError(
                    f"{var} is not set: launch with torchrun, or export MASTER_ADDR/MASTER_PORT "
                    "before srun (see examples/)"
                )
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29500")
        dist.init_process_group(
            backend=platform.dist_backend(), rank=env.rank, world_size=env.world_size,
            timeout=datetime.timedelta(minutes=parallel.timeout_minutes),
        )

    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    ps.initialize_model_parallel(
        tensor_model_parallel_size=parallel.tp,
        pipeline_model_parallel_size=parallel.pp,
        virtual_pipeline_model_parallel_size=parallel.vpp,
        context_parallel_size=parallel.cp,
        expert_model_parallel_size=parallel.ep,
        distributed_timeout_minutes=parallel.timeout_minutes,
    )
    model_parallel_cuda_manual_seed(seed)
    return ParallelContext(
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        local_rank=env.local_rank,
        tp=parallel.tp,
        pp=parallel.pp,
        cp=parallel.cp,
        dp=ps.get_data_parallel_world_size(),
        vpp=parallel.vpp,
        tp_rank=ps.get_tensor_model_parallel_rank(),
        pp_rank=ps.get_pipeline_model_parallel_rank(),
        cp_rank=ps.get_context_parallel_rank(),
        dp_rank=ps.get_data_parallel_rank(),
        tp_group=ps.get_tensor_model_parallel_group(),
        pp_group=ps.get_pipeline_model_parallel_group(),
        cp_group=ps.get_context_parallel_group(),
        dp_group=ps.get_data_parallel_group(),
        dp_cp_group=ps.get_data_parallel_group(with_context_parallel=True),
        mp_group=ps.get_model_parallel_group(),
        device=platform.device(),
    )


def teardown(destroy_process_group: bool = True) -> None:
    """Destroy Megatron's groups and (by default) the default process group."""
    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    if destroy_process_group and dist.is_initialized():
        dist.destroy_process_group()
