"""Reading and writing Hugging Face safetensors checkpoints one tensor at a time.

`HFCheckpoint` indexes a directory (`model.safetensors`, or shards listed by
`model.safetensors.index.json`) from the files' headers only, checks that every file exists
and is as long as its header says (a truncated download is caught before any conversion
starts), and reads a tensor by name with plain positioned reads: no memory map, so the
process holds exactly the tensors it is working on.

`ShardedSafetensorsWriter` streams (name, tensor) pairs, in an order planned up front, into
HF-style shards (`model-00001-of-00003.safetensors` plus `model.safetensors.index.json`),
writing each tensor as it comes, so nothing beyond the caller's tensors is held.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import torch

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"

_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor's bytes are."""

    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    """Absolute byte offset in the file."""
    nbytes: int


class HFCheckpoint:
    """The safetensors of a Hugging Face checkpoint directory, indexed by tensor name."""

    def __init__(self, hf_dir: str | Path) -> None:
        self.dir = Path(hf_dir)
        if not self.dir.is_dir():
            raise FileNotFoundError(f"{self.dir}: not a directory")
        self.tensors: dict[str, TensorInfo] = {}
        for file, names in self._files().items():
            infos = read_header(file)
            if names is not None:
                missing = sorted(set(names) - set(infos))
                if missing:
                    raise ValueError(f"{file}: lacks {missing[:5]} that {INDEX_FILE} places "
                                     f"there ({len(missing)} in all)")
                infos = {n: infos[n] for n in names}
            for name, info in infos.items():
                if name in self.tensors:
                    raise ValueError(f"{file}: tensor {name} is also in {self.tensors[name].file}")
                self.tensors[name] = info

    def _files(self) -> dict[Path, list[str] | None]:
        """Each safetensors file and the tensors the index places in it (None: all of them)."""
        index = self.dir / INDEX_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise ValueError(f"{index}: not a safetensors index ({err!r})") from err
            files: dict[Path, list[str] | None] = {}
            for name, file in weight_map.items():
                files.setdefault(self.dir / file, []).append(name)
            for file in files:
                if not file.is_file():
                    raise FileNotFoundError(f"{file}: listed in {index} but missing")
            return files
        single = self.dir / SINGLE_FILE
        if single.is_file():
            return {single: None}
        others = sorted(p.name for p in self.dir.glob("*.bin")) + sorted(
            p.name for p in self.dir.glob("*.safetensors"))
        raise FileNotFoundError(
            f"{self.dir}: neither {SINGLE_FILE} nor {INDEX_FILE} found"
            + (f" (found {', '.join(others[:4])}; only safetensors checkpoints are read)"
               if others else "")
        )

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def shape(self, name: str) -> tuple[int, ...]:
        return self._info(name).shape

    def dtype(self, name: str) -> torch.dtype:
        return self._info(name).dtype

    def read(self, name: str) -> torch.Tensor:
        """Tensor `name`, read from disk into fresh memory."""
        info = self._info(name)
        buffer = bytearray(info.nbytes)
        with open(info.file, "rb") as f:
            f.seek(info.start)
            if f.readinto(buffer) != info.nbytes:
                raise ValueError(f"{info.file}: truncated while reading {name}")
        if info.nbytes == 0:
            return torch.empty(info.shape, dtype=info.dtype)
        return torch.frombuffer(buffer, dtype=info.dtype).reshape(info.shape)

    def _info(self, name: str) -> TensorInfo:
        info = self.tensors.get(name)
        if info is None:
            raise KeyError(f"{self.dir}: no tensor named {name}")
        return info


def read_header(file: Path) -> dict[str, TensorInfo]:
    """The tensors of one safetensors file, from its header; checks the file's length."""
    size = file.stat().st_size
    with open(file, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"{file}: truncated ({size} bytes; not a safetensors file)")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > size - 8:
            raise ValueError(f"{file}: truncated (header of {header_len} bytes, file of {size})")
        try:
            header = json.loads(f.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"{file}: unreadable safetensors header ({err})") from err
    base = 8 + header_len
    infos, end = {}, 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        dtype = _DTYPES.get(entry.get("dtype"))
        if dtype is None:
            raise ValueError(f"{file}: tensor {name} has unsupported dtype {entry.get('dtype')!r}")
        begin, stop = entry["data_offsets"]
        shape = tuple(entry["shape"])
        numel = 1
        for d in shape:
            numel *= d
        if stop - begin != numel * torch.empty((), dtype=dtype).element_size():
            raise ValueError(f"{file}: tensor {name} has {stop - begin} bytes for shape {shape}")
        infos[name] = TensorInfo(file, dtype, shape, base + begin, stop - begin)
        end = max(end, stop)
    if base + end != size:
        what = "truncated" if base + end > size else "longer than its header says"
        raise ValueError(f"{file}: {what} (expected {base + end} bytes, found {size})")
    return infos


class ShardedSafetensorsWriter:
    """Streams tensors, in a planned order, into HF-style safetensors shards.

    `plan` lists every (name, shape, dtype) that will be written, in order; shards of at most
    `max_shard_bytes` (a larger tensor gets a shard of its own) and their headers are fixed
    from it up front, so each tensor goes to disk as soon as it is added and nothing is
    buffered: memory stays at what the caller holds. Files are `model.safetensors`, or
    `model-0000i-of-0000N.safetensors` plus `model.safetensors.index.json`.
    """

    def __init__(self, out_dir: str | Path,
                 plan: Sequence[tuple[str, Sequence[int], torch.dtype]],
                 max_shard_bytes: int) -> None:
        if max_shard_bytes <= 0:
            raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
        names = [name for name, _, _ in plan]
        if len(set(names)) != len(names):
            raise ValueError("the plan names a tensor twice")
        self.dir = Path(out_dir)
        self._shards = _plan_shards(plan, max_shard_bytes)
        self._expected = [(name, tuple(shape), dtype) for name, shape, dtype in plan]
        self._next = 0
        self._file = None
        self._shard = -1

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Write the next tensor of the plan."""
        if self._next >= len(self._expected):
            raise ValueError(f"tensor {name} is not in the plan (all were written)")
        want_name, want_shape, want_dtype = self._expected[self._next]
        if (name, tuple(tensor.shape), tensor.dtype) != (want_name, want_shape, want_dtype):
            raise ValueError(f"expected {want_name} {want_shape} {want_dtype} next, got "
                             f"{name} {tuple(tensor.shape)} {tensor.dtype}")
        shard = next(i for i, (_, members) in enumerate(self._shards) if name in members)
        if shard != self._shard:
            self._open(shard)
        data = tensor.detach().contiguous().cpu().reshape(-1).view(torch.uint8)
        self._file.write(memoryview(data.numpy()))  # the tensor's own bytes, no copy
        self._next += 1

    def add_all(self, pairs: Iterable[tuple[str, torch.Tensor]]) -> None:
        for name, tensor in pairs:
            self.add(name, tensor)

    def _open(self, shard: int) -> None:
        if self._file is not None:
            self._file.close()
        path, members = self._shards[shard]
        self._file = open(self.dir / path, "wb")
        self._shard = shard
        self._file.write(_header(members))

    def finish(self) -> list[Path]:
        """Close the last shard and write the index; every planned tensor must be written."""
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._next != len(self._expected):
            raise ValueError(f"{len(self._expected) - self._next} planned tensors were not "
                             f"written (next: {self._expected[self._next][0]})")
        if len(self._shards) > 1:
            total = sum(_nbytes(s, d) for _, s, d in self._expected)
            weight_map = {n: path for path, members in self._shards for n in members}
            index = {"metadata": {"total_size": total},
                     "weight_map": dict(sorted(weight_map.items()))}
            (self.dir / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        return [self.dir / path for path, _ in self._shards]


def _nbytes(shape: Sequence[int], dtype: torch.dtype) -> int:
    return math.prod(shape) * torch.empty((), dtype=dtype).element_size()


def _plan_shards(plan, max_shard_bytes: int) -> list[tuple[str, dict]]:
    """[(file name, {tensor name: (shape, dtype)})] in plan order."""
    groups: list[dict] = []
    size = 0
    for name, shape, dtype in plan:
        nbytes = _nbytes(shape, dtype)
        if not groups or (groups[-1] and size + nbytes > max_shard_bytes):
            groups.append({})
            size = 0
        groups[-1][name] = (tuple(shape), dtype)
        size += nbytes
    if not groups:
        raise ValueError("nothing to write")
    count = len(groups)
    return [(SINGLE_FILE if count == 1 else f"model-{i:05d}-of-{count:05d}.safetensors", g)
            for i, g in enumerate(groups, start=1)]


def _header(members: dict) -> bytes:
    """The safetensors header of a shard whose tensors follow back to back in `members` order."""
    names = {dtype: code for code, dtype in _DTYPES.items()}
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, (shape, dtype) in members.items():
        nbytes = _nbytes(shape, dtype)
        header[name] = {"dtype": names[dtype], "shape": list(shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # data starts 8-byte aligned, as safetensors writes it
    return struct.pack("<Q", len(text)) + text
