"""`megarl eval`: avg@n, pass@k and maj@k of a checkpoint on benchmark files.

    megarl eval --config run.yaml --hf-dir ckpt/hf --benchmarks aime24.jsonl math500.jsonl \\
        eval.samples_per_problem=32 'eval.k=[1,8,32]'

The model is served the way training serves it (`rollout` section: SGLang on GPUs, or the CPU
dev server with rollout.backend=dev), or reached at `--server-url`. A Megatron checkpoint is
first converted with tools/convert_megatron_to_hf.py (`--megatron-dir`, `--hf-config-dir`).
`--replay SAMPLES.jsonl` re-scores the responses of an earlier evaluation without a model.
Writes `results.json` (the figures) and `samples.jsonl` (every response, its extracted answer
and verdict) to `--output-dir` (default <logging.output_dir>/eval) and prints the table.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from megarl.config import ConfigError, MegarlConfig, load_config

from .benchmarks import load_benchmarks
from .evaluate import evaluate, format_table, write_result
from .serving import open_generator

RESULTS_FILE = "results.json"
SAMPLES_FILE = "samples.jsonl"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("overrides", nargs="*", metavar="SECTION.KEY=VALUE",
                        help="config overrides, e.g. eval.samples_per_problem=32")
    parser.add_argument("--config", type=Path, default=None, help="YAML config file")
    parser.add_argument("--benchmarks", nargs="+", default=None, metavar="FILE",
                        help="benchmark .jsonl files (or name=path); default eval.benchmarks")
    parser.add_argument("--hf-dir", default=None,
                        help="Hugging Face checkpoint to evaluate (sets model.hf_dir)")
    parser.add_argument("--megatron-dir", default=None,
                        help="Megatron checkpoint to evaluate: converted to HF first")
    parser.add_argument("--hf-config-dir", default=None,
                        help="with --megatron-dir: the HF checkpoint it came from (config, "
                             "tokenizer)")
    parser.add_argument("--server-url", action="append", default=None, metavar="URL",
                        help="a running SGLang or dev server (or router) serving the model; "
                             "repeatable; nothing is started")
    parser.add_argument("--replay", type=Path, default=None, metavar="SAMPLES_JSONL",
                        help="re-score recorded responses (a samples.jsonl of megarl eval)")
    parser.add_argument("--output-dir", type=Path, default=None,
                        help="where results.json and samples.jsonl go "
                             "(default <logging.output_dir>/eval)")


def load(args: argparse.Namespace) -> MegarlConfig:
    """The config from --config and overrides; flags that name a model set model.hf_dir."""
    overrides = list(args.overrides)
    model_dir = args.hf_config_dir if args.megatron_dir else args.hf_dir
    if model_dir:
        overrides.append(f"model.hf_dir={model_dir}")
    try:
        return load_config(args.config, overrides)
    except ConfigError as exc:
        if exc.key != "model.hf_dir" or args.replay is None:
            raise
    # Replaying needs no model; an empty hf_dir means plain prompts and no token counts.
    return load_config(args.config, overrides + ["model.hf_dir=''"])


def run(args: argparse.Namespace) -> int:
    if args.megatron_dir and not args.hf_config_dir:
        raise SystemExit("--megatron-dir needs --hf-config-dir (the HF checkpoint it came from)")
    cfg = load(args)
    specs = args.benchmarks or cfg.eval.benchmarks
    if not specs:
        raise SystemExit("no benchmarks: pass --benchmarks FILE ... or set eval.benchmarks")
    benchmarks = load_benchmarks(specs, cfg.eval)
    output_dir = args.output_dir or Path(cfg.logging.output_dir) / "eval"
    output_dir.mkdir(parents=True, exist_ok=True)
    total = sum(len(b.problems) for b in benchmarks)

    from megarl.metrics.progress import Progress

    with open_generator(args, cfg, output_dir) as (generator, tokenizer), \
            Progress.from_config(cfg.logging, total, desc="eval", unit="problem",
                                 print_every=1) as progress, \
            (output_dir / SAMPLES_FILE).open("w", encoding="utf-8") as samples:
        result = evaluate(generator, tokenizer, benchmarks, cfg.eval, progress=progress,
                          sample_sink=lambda record: _write_line(samples, record))
    result["model"] = _model_description(args, cfg)
    write_result(result, output_dir / RESULTS_FILE)
    print(format_table(result))
    print(f"wrote {output_dir / RESULTS_FILE} and {output_dir / SAMPLES_FILE}")
    return 0


def _write_line(f: Any, record: dict[str, Any]) -> None:
    f.write(json.dumps(record) + "\n")
    f.flush()


def _model_description(args: argparse.Namespace, cfg: MegarlConfig) -> dict[str, Any]:
    return {"hf_dir": cfg.model.hf_dir or None, "megatron_dir": args.megatron_dir,
            "server_urls": args.server_url, "replay": str(args.replay) if args.replay else None}
