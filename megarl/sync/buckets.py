"""Packing a stream of (hf_name, tensor) pairs into broadcast buckets.

A bucket is what one /update_weights_from_distributed call announces and one broadcast (or,
unflattened, one broadcast per tensor) carries. Flattened buckets lay the tensors' bytes back to
back in one uint8 buffer with no padding, which is the layout SGLang's flattened_bucket receiver
rebuilds; a tensor whose byte offset would not be a multiple of its element size starts a new
bucket instead, because the receiver refuses unaligned tensors.

Memory: one reusable buffer of `bucket_bytes` on the tensors' device, plus whatever tensor the
source iterator currently holds. A tensor at least as large as a bucket travels alone as a view
of its own bytes (no copy). The buffer is reused for the next bucket as soon as the consumer
asks for it, so a consumer must finish sending a bucket before advancing the iterator.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Iterator, Optional

import torch

from megarl.rollout.protocol import dtype_name


@dataclass
class Bucket:
    """Tensors announced and sent together."""

    names: list[str] = field(default_factory=list)
    dtypes: list[str] = field(default_factory=list)
    shapes: list[list[int]] = field(default_factory=list)
    nbytes: int = 0
    flat: Optional[torch.Tensor] = None
    """Flattened buckets: the uint8 bytes to broadcast (a view of the buffer or of a tensor)."""
    tensors: list[torch.Tensor] = field(default_factory=list)
    """Unflattened buckets: the tensors to broadcast one after the other."""

    def add(self, name: str, tensor: torch.Tensor) -> None:
        self.names.append(name)
        self.dtypes.append(dtype_name(tensor.dtype))
        self.shapes.append(list(tensor.shape))
        self.nbytes += tensor.numel() * tensor.element_size()

    def __len__(self) -> int:
        return len(self.names)


def _as_bytes(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.reshape(-1).view(torch.uint8)


def iter_buckets(named_tensors: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int, *,
                 flattened: bool = True,
                 buffer: Optional[torch.Tensor] = None) -> Iterator[Bucket]:
    """Group the stream into buckets of at most `bucket_bytes` (see the module docstring).

    buffer: a uint8 tensor of at least `bucket_bytes` to pack into, kept by the caller between
    calls (a fresh one is allocated otherwise, and its first touch is slow)."""
    if bucket_bytes <= 0:
        raise ValueError(f"bucket_bytes must be positive, got {bucket_bytes}")
    if buffer is not None and buffer.numel() < bucket_bytes:
        raise ValueError(f"buffer of {buffer.numel()} bytes is smaller than a bucket")
    bucket = Bucket()
    for name, tensor in named_tensors:
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"weight {name!r}: expected a tensor, got {type(tensor).__name__}")
        tensor = tensor.detach()
        if not tensor.is_contiguous():
            tensor = tensor.contiguous()
        nbytes = tensor.numel() * tensor.element_size()
        misaligned = flattened and bucket.nbytes % tensor.element_size() != 0
        moved = flattened and buffer is not None and buffer.device != tensor.device
        if len(bucket) and (bucket.nbytes + nbytes > bucket_bytes or misaligned or moved):
            yield _finish(bucket, buffer, flattened)
            bucket = Bucket()
        if nbytes >= bucket_bytes:  # travels alone, without a copy
            alone = Bucket()
            alone.add(name, tensor)
            alone.flat = _as_bytes(tensor) if flattened else None
            alone.tensors = [] if flattened else [tensor]
            yield alone
            continue
        if flattened:
            if buffer is None or buffer.device != tensor.device:
                buffer = torch.empty(bucket_bytes, dtype=torch.uint8, device=tensor.device)
            buffer[bucket.nbytes:bucket.nbytes + nbytes].copy_(_as_bytes(tensor))
        else:
            bucket.tensors.append(tensor)
        bucket.add(name, tensor)
    if len(bucket):
        yield _finish(bucket, buffer, flattened)


def _finish(bucket: Bucket, buffer: Optional[torch.Tensor], flattened: bool) -> Bucket:
    if flattened:
        bucket.flat = buffer[:bucket.nbytes]
    return bucket


def unpack_flat(bucket: Bucket) -> list[tuple[str, torch.Tensor]]:
    """The tensors of a flattened bucket, as views of its bytes (the receiver's view)."""
    out, offset = [], 0
    for name, dtype, shape in zip(bucket.names, bucket.dtypes, bucket.shapes):
        torch_dtype = getattr(torch, dtype)
        size = torch.Size(shape).numel() * torch_dtype.itemsize
        out.append((name, bucket.flat[offset:offset + size].view(torch_dtype).reshape(shape)))
        offset += size
    return out
