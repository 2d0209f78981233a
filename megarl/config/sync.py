"""`sync`: how new weights reach the rollout servers after each optimizer step."""

from __future__ import annotations

from dataclasses import dataclass

from .errors import check_choice, check_non_negative, check_positive


@dataclass(kw_only=True)
class SyncConfig:
    transport: str = "broadcast"
    """broadcast: a torch.distributed group between trainer rank 0 and the servers (NCCL on GPU,
    gloo on CPU); colocated: CUDA tensors handed to servers on the same GPUs."""

    bucket_mb: float = 512.0
    """Size of one broadcast bucket; tensors are packed into buckets up to this size."""

    verify: bool = False
    """After each sync, compare checksums of every server's weights with the trainer's."""

    group_port: int = 0
    """TCP port of the weight-update group's rendezvous; 0 picks a free one."""

    timeout_s: float = 600.0
    """Deadline of one weight update."""

    def validate(self) -> None:
        check_choice("sync", "transport", self.transport, ("broadcast", "colocated"))
        check_positive("sync", "bucket_mb", self.bucket_mb)
        check_non_negative("sync", "group_port", self.group_port)
        check_positive("sync", "timeout_s", self.timeout_s)
