"""The weight-sync strategy interface, and the choice of strategy from the config.

After each optimizer step the trainer streams the policy's weights, as `(hf_name, tensor)`
pairs in Hugging Face naming and layout, into `WeightSync.update(named_tensors, version=...)`.
The stream is consumed exactly once, in order, so a producer can gather each tensor just in
time (Megatron's streaming export gathers TP/PP shards per layer) and memory stays bounded.

Every trainer rank calls `update` with its own stream. With the broadcast transport, global
rank 0 sends the weights and is the only trainer rank that talks to the servers and joins the
weight-update group; on the other ranks `DrainWeightSync` just runs the stream to its end, so
the collectives a producer runs while gathering happen on every rank. With the colocated
transport, every rank hands over the copy on its own GPU (see `colocated`).
"""

from __future__ import annotations

import abc
import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional, Sequence

import torch

NamedTensors = Iterable[tuple[str, torch.Tensor]]


@dataclass
class SyncStats:
    """What one update moved, and how long it took."""

    version: str
    num_tensors: int = 0
    num_buckets: int = 0
    num_bytes: int = 0
    seconds: float = 0.0
    verified: bool = False
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def gbytes_per_s(self) -> float:
        return self.num_bytes / max(self.seconds, 1e-9) / 1e9

    def as_dict(self) -> dict[str, Any]:
        return {"version": self.version, "num_tensors": self.num_tensors,
                "num_buckets": self.num_buckets, "num_bytes": self.num_bytes,
                "seconds": self.seconds, "gbytes_per_s": self.gbytes_per_s,
                "verified": self.verified, **{f"time_{k}": v for k, v in self.timings.items()}}


class WeightSyncError(RuntimeError):
    """A weight update could not be completed; the servers may hold partial weights."""


class WeightSync(abc.ABC):
    """How new weights reach the rollout servers (one subclass per transport)."""

    def connect(self) -> None:
        """Set up the transport (e.g. the weight-update group); call once before `update`."""

    @abc.abstractmethod
    def update(self, named_tensors: NamedTensors, *, version: str) -> SyncStats:
        """Send every tensor of the stream to every server and stamp `version` on them."""

    def close(self) -> None:
        """Tear the transport down; the servers keep their weights."""

    def __enter__(self) -> "WeightSync":
        self.connect()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class DrainWeightSync(WeightSync):
    """Trainer ranks other than 0: run the stream to its end, send nothing."""

    def update(self, named_tensors: NamedTensors, *, version: str) -> SyncStats:
        stats = SyncStats(version=version)
        start = time.perf_counter()
        for _name, tensor in named_tensors:
            stats.num_tensors += 1
            stats.num_bytes += tensor.numel() * tensor.element_size()
        stats.seconds = time.perf_counter() - start
        return stats


def make_weight_sync(sync: Any, server_urls: Sequence[str], *, rank: int,
                     backend: Optional[str] = None, server_tp: int = 1,
                     colocated_group: Any = None) -> WeightSync:
    """The strategy of `sync.transport` for trainer global rank `rank` (see the module doc).

    broadcast: rank 0 sends, every other rank drains. backend is the weight-update group's
    torch.distributed backend (default nccl with CUDA, gloo without).
    colocated: trainer rank r shares its GPU with TP rank r % server_tp of server
    r // server_tp; `colocated_group` holds the trainer ranks of that server (None for one).
    """
    if sync.transport == "broadcast":
        if rank != 0:
            return DrainWeightSync()
        from .broadcast import BroadcastWeightSync

        return BroadcastWeightSync.from_config(sync, server_urls, backend=backend)
    if sync.transport == "colocated":
        server = rank // server_tp
        if server >= len(server_urls):
            return DrainWeightSync()
        from .colocated import ColocatedWeightSync

        return ColocatedWeightSync.from_config(sync, server_urls[server], group=colocated_group)
    raise ValueError(f"sync.transport: unknown transport {sync.transport!r}")
