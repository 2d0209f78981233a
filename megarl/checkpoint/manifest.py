"""`megarl_checkpoint.json`: what a megarl-written Megatron checkpoint holds.

Written next to Megatron's own files by the converter and by `save_megatron_checkpoint`: the
model shape, the Hugging Face config it came from, the padded vocabulary the tensors were
saved with, and where it came from. Readers use it to rebuild the model without the original
Hugging Face directory and to check that a given config matches.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Optional

from megarl.models.shape import ModelShape, RopeScaling

MANIFEST = "megarl_checkpoint.json"
FORMAT = "megarl.megatron_checkpoint"
VERSION = 1


def write_manifest(directory: str | Path, shape: ModelShape, *, padded_vocab: int,
                   hf_config: Optional[dict[str, Any]] = None, **extra: Any) -> Path:
    """Write the manifest into `directory`; `extra` is recorded as provenance."""
    from megarl import platform

    record = {
        "format": FORMAT,
        "version": VERSION,
        "family": shape.family,
        "shape": dataclasses.asdict(shape),
        "padded_vocab_size": padded_vocab,
        "megatron_core": platform.megatron_version(),
        **extra,
        "hf_config": hf_config,
    }
    path = Path(directory) / MANIFEST
    path.write_text(json.dumps(record, indent=2, default=str) + "\n")
    return path


def read_manifest(directory: str | Path) -> Optional[dict[str, Any]]:
    """The manifest of `directory`, or None when it has none (not written by megarl)."""
    path = Path(directory) / MANIFEST
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    if record.get("format") != FORMAT or record.get("version") != VERSION:
        raise ValueError(f"{path}: format {record.get('format')!r} version "
                         f"{record.get('version')!r} is not {FORMAT} version {VERSION}")
    return record


def shape_from_manifest(record: dict[str, Any]) -> ModelShape:
    fields = dict(record["shape"])
    if fields.get("rope_scaling") is not None:
        fields["rope_scaling"] = RopeScaling(**fields["rope_scaling"])
    return ModelShape(**fields)


def shape_differences(a: ModelShape, b: ModelShape) -> list[str]:
    """`field: a != b` for every field where two shapes disagree."""
    return [f"{f.name}: {getattr(a, f.name)!r} != {getattr(b, f.name)!r}"
            for f in dataclasses.fields(ModelShape) if getattr(a, f.name) != getattr(b, f.name)]
