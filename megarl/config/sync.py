"""`sync`: how new weights reach the rollout servers after each optimizer step."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from .errors import check_choice, check_non_negative, check_positive, check_range


@dataclass(kw_only=True)
class SyncConfig:
    transport: str = "broadcast"
    """broadcast: a torch.distributed group between trainer global rank 0 (the only trainer
    rank in it) and the servers (NCCL on GPU, gloo on CPU); colocated: CUDA tensors handed to
    servers on the same GPUs."""

    bucket_mb: float = 512.0
    """Size of one bucket: the tensors announced by one /update_weights_from_distributed call
    (and, with flattened_buckets, packed into one broadcast)."""

    verify: bool = False
    """After each sync, compare checksums of every server's weights with the trainer's."""

    group_port: int = 0
    """TCP port of the weight-update group's rendezvous; 0 picks a free one."""

    master_address: Optional[str] = None
    """Address at which the servers reach trainer rank 0 for the weight-update group; null
    means 127.0.0.1 when every server is on this host and this host's IP address otherwise."""

    pause_mode: str = "abort"
    """How generation is paused around an update (SGLang's pause_generation modes): abort
    (in-flight requests end with finish_reason abort and the client retries them), retract
    (they are requeued and resumed with the new weights) or in_place (they wait with their KV
    cache; the prefix cache is then not flushed, so cached prefixes keep old-weight KV)."""

    flattened_buckets: bool = False
    """false: one broadcast per tensor, straight from the trainer's tensors (no copy; a bucket
    is then one announcement). true: one broadcast per bucket with the tensors packed back to
    back (SGLang's load_format=flattened_bucket): fewer collectives for models of many small
    tensors, at the price of a packing copy on each side."""

    timeout_s: float = 600.0
    """Deadline of one weight update."""

    def validate(self) -> None:
        check_choice("sync", "transport", self.transport, ("broadcast", "colocated"))
        check_positive("sync", "bucket_mb", self.bucket_mb)
        check_non_negative("sync", "group_port", self.group_port)
        check_range("sync", "group_port", self.group_port, high=65535)
        check_positive("sync", "timeout_s", self.timeout_s)
        check_choice("sync", "pause_mode", self.pause_mode, ("abort", "retract", "in_place"))
