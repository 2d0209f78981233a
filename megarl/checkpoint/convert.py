"""Offline conversion, Hugging Face <-> Megatron distributed checkpoint, a layer at a time.

`hf_to_megatron` reads the HF safetensors lazily by name and writes a torch_dist checkpoint
(TP=1 layout, loadable at any TP/PP) one *unit* at a time: the embedding, each decoder layer,
and the final norm with the output layer. Peak memory is about one unit (the embedding or the
output layer being the largest), whatever the model size. Under torchrun the ranks share the
units (rank r converts units r, r + world, ...).

`megatron_to_hf` reads the checkpoint back unit by unit and streams HF-style sharded
safetensors (each tensor written as it is converted, so again about one unit in memory),
with the config and tokenizer files of a reference HF directory.

Everything the inputs can get wrong (missing or truncated files, a config that does not match
the weights, an unsupported architecture, an existing output) is checked before the first
tensor is converted, and the output appears only when complete (`megarl.checkpoint.output`).
The command lines are `tools/convert_hf_to_megatron.py` and `tools/convert_megatron_to_hf.py`.
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
from pathlib import Path
from typing import Iterator, Optional, Sequence

import torch.distributed as dist

from megarl.checkpoint import megatron_layout as layout
from megarl.checkpoint.adapters import EMBEDDING, DenseDecoderAdapter, adapter_for
from megarl.checkpoint.dist_io import (
    StreamingCheckpointWriter, extra_state_objects, read_tensors, sharded_tensors, stored_tensors,
)
from megarl.checkpoint.hf_io import HFCheckpoint, ShardedSafetensorsWriter
from megarl.checkpoint.manifest import (
    read_manifest, shape_differences, shape_from_manifest, write_manifest,
)
from megarl.checkpoint.model_io import open_hf_checkpoint
from megarl.checkpoint.output import check_output, staged_output
from megarl.checkpoint.transforms import Dims
from megarl.config import ParallelConfig
from megarl.metrics.progress import Progress
from megarl.models.hf import load_hf_config, shape_from_hf_config, shape_from_hf_dir
from megarl.models.shape import ModelShape
from megarl.parallel.groups import launch_env
from megarl.parallel.topology import check_topology, padded_vocab_size

# Files of an HF directory that hold weights; everything else (config, tokenizer, chat
# template, generation config) is copied along by megatron_to_hf.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf")
_WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


def units(names: Sequence[str]) -> list[list[str]]:
    """Canonical parameter names grouped into conversion units: the embedding, each layer in
    order, then everything after the layers."""
    first, layers, last = [], {}, []
    for name in names:
        _, layer = layout.checkpoint_key(name)
        if layer is not None:
            layers.setdefault(layer, []).append(name)
        elif name.startswith("embedding."):
            first.append(name)
        else:
            last.append(name)
    return [u for u in [first, *(layers[i] for i in sorted(layers)), last] if u]


@contextlib.contextmanager
def process_group() -> Iterator[None]:
    """A torch.distributed group for the converter: the one that exists, torchrun's, or a
    single-process one (Megatron's checkpointing needs one). Always gloo: tensors stay on CPU."""
    from megarl import platform

    platform.apply()  # Megatron's checkpoint writer calls CUDA functions; CPU mode when absent
    if dist.is_initialized():
        yield
        return
    env = launch_env()
    if env.world_size == 1:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    else:
        dist.init_process_group("gloo", rank=env.rank, world_size=env.world_size)
    try:
        yield
    finally:
        dist.destroy_process_group()


# --------------------------------------------------------------------------------------------
# Hugging Face -> Megatron


def hf_to_megatron(
    hf_dir: str | Path, output_dir: str | Path, *, tp: int = 1, pp: int = 1,
    vocab_divisible_by: int = 128, overwrite: bool = False, progress: str = "auto",
) -> Path:
    """Convert the HF checkpoint in `hf_dir` into a torch_dist checkpoint at `output_dir`.

    `tp` and `pp` name the layout the checkpoint is meant for: they are checked against the
    model, and `tp` sets the vocabulary padding; the checkpoint itself loads at any layout.
    """
    check_output(output_dir, overwrite)
    shape, config = shape_from_hf_dir(hf_dir)
    check_topology(ParallelConfig(tp=tp, pp=pp), tp * pp, shape, vocab_divisible_by)
    adapter, checkpoint = open_hf_checkpoint(hf_dir, shape)
    dims = Dims(shape, padded_vocab_size(shape.vocab_size, tp, vocab_divisible_by))
    work = units(list(adapter.rules(shape)))
    with process_group():
        rank, world = dist.get_rank(), dist.get_world_size()
        with staged_output(output_dir, overwrite, distributed=True) as staging, \
                Progress(len(work), desc="hf->megatron", unit="unit", mode=progress,
                         enabled=rank == 0) as bar:
            writer = StreamingCheckpointWriter(staging)
            for start in range(0, len(work), world):
                if start + rank < len(work):
                    writer.write_unit(_unit_state(work[start + rank], adapter, checkpoint, dims))
                bar.advance(min(world, len(work) - start))  # the other ranks keep pace
            writer.finish()
            if rank == 0:
                write_manifest(staging, shape, padded_vocab=dims.padded_vocab, hf_config=config,
                               written_by="tools/convert_hf_to_megatron.py",
                               source=str(Path(hf_dir).absolute()),
                               layout={"tp": tp, "pp": pp},
                               dtype=str(checkpoint.dtype(EMBEDDING.hf[0])))
    return Path(output_dir)


def _unit_state(names: list[str], adapter: DenseDecoderAdapter, checkpoint: HFCheckpoint,
                dims: Dims) -> dict:
    """The sharded state dict of one unit: its tensors, and its layer's `_extra_state`."""
    state = {}
    layers = dims.shape.num_layers
    for name in names:
        full = adapter.from_hf(name, checkpoint.read, dims)
        state.update(sharded_tensors(name, full, layers))
    found = {layout.checkpoint_key(n)[1] for n in names} - {None}
    for layer in found:
        state.update(extra_state_objects(layer, layers))
    return state


# --------------------------------------------------------------------------------------------
# Megatron -> Hugging Face


def megatron_to_hf(
    megatron_dir: str | Path, output_dir: str | Path, hf_config_dir: str | Path, *,
    overwrite: bool = False, max_shard_bytes: int = 5 * 10**9, progress: str = "auto",
) -> Path:
    """Write the weights of the torch_dist checkpoint `megatron_dir` as HF safetensors, with
    config and tokenizer files from `hf_config_dir`."""
    check_output(output_dir, overwrite)
    shape = _checked_shape(megatron_dir, hf_config_dir)
    adapter = adapter_for(shape.family)
    stored = stored_tensors(megatron_dir)
    dims = Dims(shape, _stored_vocab_rows(stored, megatron_dir))
    expected = adapter.megatron_shapes(dims)
    _check_stored(stored, expected, shape, megatron_dir)
    work = units(list(expected))
    with process_group():
        if dist.get_world_size() > 1:
            raise RuntimeError("convert_megatron_to_hf runs in one process; start it without "
                               "torchrun")
        with staged_output(output_dir, overwrite) as staging, \
                Progress(len(work), desc="megatron->hf", unit="unit", mode=progress) as bar:
            plan = [(hf, hf_shape, stored[layout.checkpoint_key(name)[0]][1])
                    for name in expected for hf, hf_shape in adapter.hf_outputs(name, shape)]
            writer = ShardedSafetensorsWriter(staging, plan, max_shard_bytes)
            for unit in work:
                for name, full in read_tensors(megatron_dir, unit, stored).items():
                    writer.add_all(adapter.to_hf(name, full, dims))
                bar.advance(1)
            writer.finish()
            _copy_config_files(Path(hf_config_dir), staging)
    return Path(output_dir)


def _checked_shape(megatron_dir: str | Path, hf_config_dir: str | Path) -> ModelShape:
    """The model shape, from the reference config, checked against the checkpoint's manifest."""
    config_path = Path(hf_config_dir) / "config.json"
    shape = shape_from_hf_config(load_hf_config(hf_config_dir), where=str(config_path))
    manifest = read_manifest(megatron_dir)
    if manifest is not None:
        recorded = shape_from_manifest(manifest)
        differences = shape_differences(recorded, shape)
        if differences:
            raise ValueError(f"{config_path} does not describe the model in {megatron_dir} "
                             f"(checkpoint vs config): {'; '.join(differences)}")
    return shape


def _stored_vocab_rows(stored: dict, megatron_dir: str | Path) -> int:
    key = "embedding.word_embeddings.weight"
    if key not in stored:
        raise KeyError(f"{megatron_dir}: the checkpoint has no tensor {key}")
    return stored[key][0][0]


def _check_stored(stored: dict, expected: dict, shape: ModelShape, where) -> None:
    """Every expected parameter is stored, stacked over the layers, with the expected shape."""
    problems = []
    for name, full_shape in expected.items():
        key, layer = layout.checkpoint_key(name)
        want = full_shape if layer is None else (shape.num_layers, *full_shape)
        if key not in stored:
            problems.append(f"missing {key}")
        elif stored[key][0] != want:
            problems.append(f"{key} has shape {stored[key][0]}, the config implies {want}")
    if shape.vocab_size > _stored_vocab_rows(stored, where):
        problems.append(f"the embedding has fewer rows than the vocabulary ({shape.vocab_size})")
    if problems:
        unique = sorted(set(problems))
        raise ValueError(f"{where}: the checkpoint does not match the config: "
                         + "; ".join(unique[:8]) + (" ..." if len(unique) > 8 else ""))


def _copy_config_files(source: Path, target: Path) -> None:
    for path in sorted(source.iterdir()):
        if path.is_file() and not path.name.endswith(_WEIGHT_SUFFIXES) \
                and path.name not in _WEIGHT_INDEXES:
            shutil.copy2(path, target / path.name)


# --------------------------------------------------------------------------------------------
# Command lines (tools/convert_*.py)


def main_hf_to_megatron(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        description="Convert a Hugging Face checkpoint (qwen2, qwen3, llama) into a Megatron "
        "distributed checkpoint (torch_dist) that loads at any TP/PP. Runs in one process or "
        "under torchrun (ranks share the layers).")
    parser.add_argument("--hf-dir", required=True, help="HF model directory (safetensors)")
    parser.add_argument("--output-dir", required=True, help="where the checkpoint goes")
    parser.add_argument("--tp", type=int, default=1, help="intended tensor-parallel size "
                        "(checked against the model; sets the vocabulary padding)")
    parser.add_argument("--pp", type=int, default=1, help="intended pipeline-parallel size "
                        "(checked against the model)")
    parser.add_argument("--make-vocab-size-divisible-by", type=int, default=128)
    _common_arguments(parser)
    args = parser.parse_args(argv)
    hf_to_megatron(args.hf_dir, args.output_dir, tp=args.tp, pp=args.pp,
                   vocab_divisible_by=args.make_vocab_size_divisible_by,
                   overwrite=args.overwrite, progress=args.progress)
    if launch_env().rank == 0:
        print(f"wrote {args.output_dir}")
    return 0


def main_megatron_to_hf(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        description="Convert a Megatron distributed checkpoint written by megarl back into "
        "Hugging Face safetensors, with config and tokenizer files from --hf-config-dir.")
    parser.add_argument("--megatron-dir", required=True)
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--hf-config-dir", required=True,
                        help="HF directory whose config.json and tokenizer files are copied")
    parser.add_argument("--max-shard-size-gb", type=float, default=5.0)
    _common_arguments(parser)
    args = parser.parse_args(argv)
    megatron_to_hf(args.megatron_dir, args.output_dir, args.hf_config_dir,
                   overwrite=args.overwrite, max_shard_bytes=int(args.max_shard_size_gb * 1e9),
                   progress=args.progress)
    print(f"wrote {args.output_dir}")
    return 0


def _common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing output directory (only once the new one is "
                        "complete)")
    parser.add_argument("--progress", choices=("auto", "on", "off"), default="auto",
                        help="live progress bar: auto (on a terminal), on, off (plain lines)")


def run_tool(main) -> int:
    """Run a tool's main, turning input errors into one line on stderr and exit status 1."""
    import sys

    try:
        return main()
    except (ValueError, KeyError, FileNotFoundError, FileExistsError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
