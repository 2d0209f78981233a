"""Weight sync for colocated servers: CUDA tensors handed over by IPC handle, no copy on the wire.

In colocated mode (rollout.mode=colocated) each server TP rank shares a GPU with one trainer
rank; the trainer ranks on one server's GPUs form that server's `group` (group rank r shares
the GPU of server TP rank r). One step:

    rollout -> release_memory()   servers pause and free weights, KV cache and CUDA graphs
            -> (the actor trains in the freed memory)
            -> update(named_tensors)  resume the servers' weights, hand over the new tensors,
                                      resume KV cache and CUDA graphs, stamp the version,
                                      continue generation

`update` groups the stream into buckets (`sync.bucket_mb`); for each, every rank of the group
serializes a handle to its own GPU copy (`serializer`, SGLang's MultiprocessingSerializer by
default), the group leader gathers them and posts one /update_weights_from_tensor with one
payload per server TP rank, and the group waits at a barrier until the server has loaded the
bucket before the tensors may be freed. Only the group leader talks to the server.

What needs no GPU (payloads, call order, gathering) is tested on CPU against a fake server;
the CUDA IPC path is tested in tests/gpu/ with a real SGLang server.
"""

from __future__ import annotations

import base64
import io
import logging
import time
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist

from megarl.rollout import protocol as P
from megarl.rollout.admin import ServerAdmin
from megarl.rollout.http import EventLoopThread

from .base import NamedTensors, SyncStats, WeightSync
from .buckets import iter_buckets

logger = logging.getLogger(__name__)

Serializer = Callable[[list[tuple[str, torch.Tensor]]], str]

RESIDENT_AFTER_WEIGHTS = ("kv_cache", "cuda_graph")


def sglang_serializer(named_tensors: list[tuple[str, torch.Tensor]]) -> str:
    """SGLang's own serialization (CUDA IPC handles keyed by device UUID), base64 for HTTP."""
    from sglang.srt.utils.common import MultiprocessingSerializer
    from sglang.srt.utils.patch_torch import monkey_patch_torch_reductions

    monkey_patch_torch_reductions()
    return MultiprocessingSerializer.serialize(named_tensors, output_str=True)


def forking_pickle_serializer(named_tensors: list[tuple[str, torch.Tensor]]) -> str:
    """The same wire format without SGLang: torch's multiprocessing pickler, base64.

    Readable by `MultiprocessingSerializer.deserialize` in a process that may open the
    handles (CPU tensors travel as shared-memory file descriptors)."""
    from multiprocessing.reduction import ForkingPickler

    buf = io.BytesIO()
    ForkingPickler(buf).dump(named_tensors)
    return base64.b64encode(buf.getvalue()).decode("ascii")


class ColocatedWeightSync(WeightSync):
    """The colocated transport for one server and the trainer ranks sharing its GPUs."""

    def __init__(self, server_url: str, *, bucket_mb: float = 512.0, timeout_s: float = 600.0,
                 pause_mode: str = "abort", group: Any = None,
                 serializer: Optional[Serializer] = None) -> None:
        self.server_url = server_url.rstrip("/")
        self.bucket_bytes = int(bucket_mb * 2**20)
        self.timeout_s = timeout_s
        self.pause_mode = pause_mode
        self.group = group
        self.serializer = serializer or sglang_serializer
        self.is_leader = group is None or dist.get_rank(group) == 0
        self._loop: Optional[EventLoopThread] = None
        self.admin: Optional[ServerAdmin] = None
        self.released = False

    @classmethod
    def from_config(cls, sync: Any, server_url: str, *, group: Any = None) -> "ColocatedWeightSync":
        return cls(server_url, bucket_mb=sync.bucket_mb, timeout_s=sync.timeout_s,
                   pause_mode=sync.pause_mode, group=group)

    def connect(self) -> None:
        if self.is_leader and self.admin is None:
            self._loop = EventLoopThread("megarl-colocated-sync")
            self.admin = ServerAdmin([self.server_url], loop=self._loop, timeout_s=self.timeout_s)

    def close(self) -> None:
        if self._loop is not None:
            self._loop.close()
            self._loop, self.admin = None, None

    def release_memory(self) -> None:
        """After a rollout: pause the server and free its GPU memory for training."""
        if self.is_leader:
            self.admin.pause(self.pause_mode)
            self.admin.release_memory()
        self.released = True

    def update(self, named_tensors: NamedTensors, *, version: str) -> SyncStats:
        stats = SyncStats(version=str(version))
        start = time.perf_counter()
        if self.is_leader:
            if self.released:
                self.admin.resume_memory(["weights"])
            else:  # never released: still pause, as for the broadcast transport
                self.admin.pause(self.pause_mode)
            self.admin.begin_weight_update()
        for bucket in iter_buckets(named_tensors, self.bucket_bytes, flattened=False):
            self._send(list(zip(bucket.names, bucket.tensors)))
            stats.num_buckets += 1
            stats.num_tensors += len(bucket)
            stats.num_bytes += bucket.nbytes
        if self.is_leader:
            self.admin.end_weight_update()
            if self.released:
                self.admin.resume_memory(RESIDENT_AFTER_WEIGHTS)
            if self.pause_mode != "in_place":  # in_place keeps its KV cache by design
                self.admin.flush_cache()
            self.admin.set_weight_version(stats.version)
            self.admin.resume()
        self.released = False
        stats.seconds = time.perf_counter() - start
        return stats

    def _send(self, named: list[tuple[str, torch.Tensor]]) -> None:
        payload = self.serializer(named)
        if self.group is None:
            per_rank = [payload]
        else:
            per_rank = [None] * dist.get_world_size(self.group) if self.is_leader else None
            dist.gather_object(payload, per_rank, group_dst=0, group=self.group)
        if self.is_leader:
            self.admin.call_all("/update_weights_from_tensor",
                                P.update_weights_from_tensor_payload(per_rank))
        if self.group is not None:
            # the server reads the tensors through their handles: keep them until it is done
            dist.barrier(group=self.group)


def server_group(num_servers: int, server_tp: int) -> Any:
    """The process group of the trainer ranks sharing this rank's server (None when the server
    has one GPU, or when this rank shares no server's GPU).

    Trainer rank r sits on the GPU of TP rank r % server_tp of server r // server_tp. Collective
    over all trainer ranks: every rank creates every group, in the same order.
    """
    if server_tp == 1:
        return None
    mine = None
    for server in range(num_servers):
        ranks = list(range(server * server_tp, (server + 1) * server_tp))
        group = dist.new_group(ranks)
        if dist.get_rank() in ranks:
            mine = group
    return mine
