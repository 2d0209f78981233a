"""Weight updates of the CPU development server, the way SGLang's update_weights_from_distributed
receives them.

For development, tests and the CPU demo only. The server joins the trainer's weight-update
group (`/init_weights_update_group`: rank = rank_offset, since a dev server is one TP rank),
and for each `/update_weights_from_distributed` call receives the announced tensors from group
rank 0: one uint8 broadcast of all their bytes back to back for load_format flattened_bucket,
otherwise one broadcast per tensor in the announced order. It receives first and checks names
and shapes afterwards, as SGLang does, so a bad announcement never leaves the trainer blocked
in a broadcast. Updates are only accepted inside a begin/end_weight_update session (SGLang
0.5.23's rule).
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
import torch.distributed as dist

from megarl.sync.group import create_weight_update_group, destroy_weight_update_group
from megarl.sync.verify import tensor_checksum

from .dev_engine import DevEngine


class WeightUpdateError(RuntimeError):
    """A weight-update call failed; the server replies success=false with this message."""


def resolve_dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, str(name).removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype):
        raise WeightUpdateError(f"unknown dtype {name!r}")
    return dtype


class WeightReceiver:
    """The server side of the weight-update group of one dev server."""

    def __init__(self, model: torch.nn.Module, engine: DevEngine) -> None:
        self.model = model
        self.engine = engine
        # state_dict keeps tied aliases (lm_head.weight of a tied model) that trainers send
        self.params: dict[str, torch.Tensor] = dict(model.state_dict(keep_vars=True))
        self.groups: dict[str, Any] = {}
        self.session_open = False
        # the receive buffer of flattened buckets, kept between calls (allocation is slow)
        self._flat: Optional[torch.Tensor] = None

    def init_group(self, *, master_address: str, master_port: int, rank_offset: int,
                   world_size: int, group_name: str, backend: str, timeout_s: float) -> str:
        if group_name in self.groups:
            raise WeightUpdateError(f"group {group_name!r} exists: destroy it first")
        if backend != "gloo":
            raise WeightUpdateError(f"backend {backend!r}: the dev server is CPU-only, use gloo")
        self.groups[group_name] = create_weight_update_group(
            master_address=master_address, master_port=master_port, rank=rank_offset,
            world_size=world_size, group_name=group_name, backend=backend, timeout_s=timeout_s)
        return f"joined {group_name!r} as rank {rank_offset} of {world_size}"

    def destroy_group(self, group_name: str) -> str:
        group = self.groups.pop(group_name, None)
        if group is None:
            raise WeightUpdateError(f"group {group_name!r} does not exist")
        destroy_weight_update_group(group)
        return f"destroyed {group_name!r}"

    def begin(self) -> str:
        if self.session_open:
            raise WeightUpdateError("a weight-update session is already open; end it first")
        self.session_open = True
        return "session opened"

    def end(self) -> str:
        if not self.session_open:
            raise WeightUpdateError("no weight-update session is open")
        self.session_open = False
        return "session closed"

    def update_from_distributed(self, *, names: Sequence[str], dtypes: Sequence[str],
                                shapes: Sequence[Sequence[int]], group_name: str,
                                load_format: Optional[str]) -> str:
        if not self.session_open:
            raise WeightUpdateError("update_weights_from_distributed must run between "
                                    "begin_weight_update and end_weight_update")
        group = self.groups.get(group_name)
        if group is None:
            raise WeightUpdateError(f"group {group_name!r} not initialised: call "
                                    "/init_weights_update_group first")
        if not len(names) == len(dtypes) == len(shapes):
            raise WeightUpdateError(f"names, dtypes and shapes differ in length "
                                    f"({len(names)}, {len(dtypes)}, {len(shapes)})")
        torch_dtypes = [resolve_dtype(d) for d in dtypes]
        if load_format == "flattened_bucket":
            self._flat = _grown(self._flat, _flat_size(names, torch_dtypes, shapes))
            received = _receive_flattened(names, torch_dtypes, shapes, group, self._flat)
            self._load(received)
        elif load_format is None:
            with self.engine.exclusive():
                received = _receive_each(names, torch_dtypes, shapes, group, self._targets)
            self._load([(n, t) for n, t in received if t.data_ptr() != self._target_ptr(n, t)])
        else:
            raise WeightUpdateError(f"load_format {load_format!r} not supported by the dev server")
        return f"loaded {len(received)} tensors"

    def _targets(self, name: str, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
        """Where a tensor of a per-tensor broadcast lands: straight in the parameter when it
        fits exactly (no copy), else a scratch tensor that `_load` checks and copies."""
        param = self.params.get(name)
        if (param is not None and param.dtype == dtype and tuple(param.shape) == shape
                and param.is_contiguous()):
            return param.data
        return torch.empty(shape, dtype=dtype)

    def _target_ptr(self, name: str, tensor: torch.Tensor) -> int:
        param = self.params.get(name)
        return -1 if param is None else param.data_ptr()

    def _load(self, received: list[tuple[str, torch.Tensor]]) -> None:
        for name, tensor in received:
            param = self.params.get(name)
            if param is None:
                raise WeightUpdateError(f"unknown parameter {name!r}")
            if tuple(param.shape) != tuple(tensor.shape):
                raise WeightUpdateError(f"{name}: shape {tuple(tensor.shape)} differs from the "
                                        f"model's {tuple(param.shape)}")
        with self.engine.exclusive(), torch.no_grad():
            for name, tensor in received:
                self.params[name].copy_(tensor)

    def weights_by_name(self, name: str, truncate_size: int) -> list:
        """SGLang's /get_weights_by_name reply: the first rows, as float32 lists."""
        param = self.params.get(name)
        if param is None:
            raise WeightUpdateError(f"unknown parameter {name!r}")
        return param.detach().float().tolist()[:truncate_size]

    def checksums(self, names: Optional[Sequence[str]] = None) -> dict[str, str]:
        selected = self.params if names is None else {n: self._param(n) for n in names}
        with self.engine.exclusive():
            return {name: tensor_checksum(t) for name, t in selected.items()}

    def _param(self, name: str) -> torch.Tensor:
        if name not in self.params:
            raise WeightUpdateError(f"unknown parameter {name!r}")
        return self.params[name]


def _check_shape(name: str, shape: Sequence[int]) -> tuple[int, ...]:
    if not all(isinstance(d, int) and d >= 0 for d in shape):
        raise WeightUpdateError(f"{name}: invalid shape {shape!r}")
    return tuple(shape)


def _flat_size(names, dtypes, shapes) -> int:
    return sum(torch.Size(_check_shape(n, s)).numel() * d.itemsize
               for n, d, s in zip(names, dtypes, shapes))


def _grown(buffer: Optional[torch.Tensor], size: int) -> torch.Tensor:
    if buffer is None or buffer.numel() < size:
        return torch.empty(size, dtype=torch.uint8)
    return buffer


def _receive_flattened(names, dtypes, shapes, group, buffer) -> list[tuple[str, torch.Tensor]]:
    layout, offset = [], 0
    for name, dtype, shape in zip(names, dtypes, shapes):
        shape = _check_shape(name, shape)
        if offset % dtype.itemsize:
            raise WeightUpdateError(f"{name}: byte offset {offset} is not aligned to {dtype}")
        size = torch.Size(shape).numel() * dtype.itemsize
        layout.append((name, dtype, shape, offset, size))
        offset += size
    if not layout:
        raise WeightUpdateError("empty bucket")
    flat = buffer[:offset]
    dist.broadcast(flat, group_src=0, group=group)
    return [(name, flat[start:start + size].view(dtype).reshape(shape))
            for name, dtype, shape, start, size in layout]


def _receive_each(names, dtypes, shapes, group, target) -> list[tuple[str, torch.Tensor]]:
    tensors = [(n, target(n, d, _check_shape(n, s))) for n, d, s in zip(names, dtypes, shapes)]
    works = [dist.broadcast(t, group_src=0, group=group, async_op=True) for _, t in tensors]
    for work in works:
        work.wait()
    return tensors
