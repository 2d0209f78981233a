"""Where `megarl eval` gets responses from: recorded samples, running servers, or servers it
starts for an HF checkpoint (converted from Megatron first when asked)."""

from __future__ import annotations

import argparse
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional

from megarl.config import MegarlConfig

from .generation import Generator, RecordedGenerator

CONVERTER = Path(__file__).resolve().parents[2] / "tools" / "convert_megatron_to_hf.py"


def load_tokenizer(hf_dir: Optional[str]) -> Optional[Any]:
    """The checkpoint's tokenizer, or None without a checkpoint."""
    if not hf_dir:
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(hf_dir)


def convert_megatron(megatron_dir: str, hf_config_dir: str, output_dir: Path) -> Path:
    """Run tools/convert_megatron_to_hf.py into `output_dir`; its path."""
    if not CONVERTER.is_file():
        raise FileNotFoundError(f"{CONVERTER} not found: --megatron-dir needs a source checkout "
                                "of megarl (the converter is a tool script, not a module)")
    command = [sys.executable, str(CONVERTER), "--megatron-dir", megatron_dir,
               "--output-dir", str(output_dir), "--hf-config-dir", hf_config_dir]
    print("converting:", " ".join(command), flush=True)
    subprocess.run(command, check=True)
    return output_dir


@contextmanager
def open_generator(args: argparse.Namespace, cfg: MegarlConfig,
                   output_dir: Path) -> Iterator[tuple[Generator, Optional[Any]]]:
    """(generator, tokenizer) for the source the command line names; servers started here
    are stopped on exit."""
    if args.replay is not None:
        tokenizer = load_tokenizer(cfg.model.hf_dir)
        yield RecordedGenerator(str(args.replay), tokenizer, cfg.eval), tokenizer
        return
    # With --megatron-dir, model.hf_dir is the source checkpoint (--hf-config-dir): its
    # tokenizer is the model's, whatever files the converter writes.
    tokenizer = load_tokenizer(cfg.model.hf_dir)
    weights_dir = cfg.model.hf_dir
    if args.megatron_dir:
        weights_dir = str(convert_megatron(args.megatron_dir, args.hf_config_dir,
                                           output_dir / "hf"))
    with _served(weights_dir, cfg, args.server_url, tokenizer) as generator:
        yield generator, tokenizer


@contextmanager
def _served(hf_dir: str, cfg: MegarlConfig, server_urls: Optional[list[str]],
            tokenizer: Any) -> Iterator[Generator]:
    # Wired to megarl.rollout's client once it is in the tree; until then only --replay works.
    raise RuntimeError("megarl eval cannot serve a model yet: megarl.rollout's client is not in "
                       "this tree; use --replay SAMPLES.jsonl")
    yield
