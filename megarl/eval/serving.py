"""Where `megarl eval` gets responses from: recorded samples, running servers, or servers it
starts for an HF checkpoint (converted from Megatron first when asked)."""

from __future__ import annotations

import argparse
import dataclasses
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional

from megarl.config import MegarlConfig

from .generation import ClientGenerator, Generator, RecordedGenerator

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
    # With --megatron-dir, model.hf_dir is the source checkpoint (--hf-config-dir): its
    # tokenizer is the model's, whatever files the converter writes.
    tokenizer = load_tokenizer(cfg.model.hf_dir)
    if args.replay is not None:
        yield RecordedGenerator(str(args.replay), tokenizer, cfg.eval), tokenizer
        return
    weights_dir = cfg.model.hf_dir
    if args.megatron_dir:
        weights_dir = str(convert_megatron(args.megatron_dir, args.hf_config_dir,
                                           output_dir / "hf"))
    log_dir = output_dir / "server_logs"
    with _served(weights_dir, cfg, args.server_url, tokenizer, log_dir) as generator:
        yield generator, tokenizer


@contextmanager
def _served(weights_dir: str, cfg: MegarlConfig, server_urls: Optional[list[str]],
            tokenizer: Any, log_dir: Path) -> Iterator[Generator]:
    """A generator over servers: those at `server_urls`, or ones started as the `rollout`
    section says (SGLang, or the CPU dev server) for `weights_dir`, stopped on exit."""
    from megarl.rollout.client import RolloutClient
    from megarl.rollout.servers import RolloutServers

    rollout = cfg.rollout
    if server_urls:
        # Whatever answers at these URLs is used as is: no router in front, nothing started.
        rollout = dataclasses.replace(rollout, server_urls=list(server_urls), router_url=None,
                                      use_router=False)
    with RolloutServers(rollout, model_path=weights_dir, log_dir=log_dir) as servers:
        client = RolloutClient.from_config(rollout, servers.generate_urls)
        try:
            yield ClientGenerator(client, tokenizer, cfg.eval)
        finally:
            client.close()
