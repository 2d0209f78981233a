"""`megarl demo`: the whole system on a CPU in a few minutes, as the first thing a user runs.

1. builds a tiny Qwen2 model and a character-level tokenizer in Hugging Face format, warm-started
   on the answer format of a digit-addition task (`3+4=` -> `\\boxed{7}`) with mostly wrong
   answers, so it starts near chance;
2. converts it to a Megatron checkpoint with `tools/convert_hf_to_megatron.py`;
3. writes the prompt dataset and a complete megarl config (`<output-dir>/demo.yaml`);
4. runs `megarl train` under torchrun on 2 trainer processes (TP=2) with the CPU dev server and
   sglang-router: GRPO plus SIREN (or `--intervention NAME`), math-verify rewards, weight
   broadcast after every step;
5. prints a summary table and writes `report.png` / `report.html` (reward, entropy, nucleus
   entropy, ...) next to metrics.jsonl and the TensorBoard events.

Rerun step 4 alone with `torchrun --nproc-per-node 2 -m megarl.cli train --config
<output-dir>/demo.yaml`.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from megarl.config import from_dict, to_yaml
from megarl.config.entropy import BUILTIN_INTERVENTIONS

ALPHABET = "0123456789+=\\boxed{}"
MAX_OPERAND = 4          # a, b in 0..4: 25 facts, answers 0..8 (chance is about 1/9)
WARM_START_CORRECT = 0.3  # probability the warm-started policy gives to the right sum


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--intervention", default="siren",
                        help=f"entropy intervention: {', '.join(BUILTIN_INTERVENTIONS)}")
    parser.add_argument("--steps", type=int, default=60, help="training steps")
    parser.add_argument("--output-dir", type=Path, default=Path("runs/demo"),
                        help="work directory (model, data, checkpoints, metrics, plots)")
    parser.add_argument("--tp", type=int, default=2, help="trainer processes (tensor parallel)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--quick", action="store_true",
                        help="a much shorter run (for tests): fewer steps and prompts")


def run(args: argparse.Namespace) -> int:
    if args.intervention not in BUILTIN_INTERVENTIONS:
        print(f"megarl demo: --intervention must be one of {', '.join(BUILTIN_INTERVENTIONS)}",
              file=sys.stderr)
        return 2
    work = args.output_dir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    _say(1, f"building a tiny model and tokenizer in {work / 'hf'}")
    hf_dir = build_model(work / "hf", seed=args.seed, warm_start_steps=100 if args.quick else 800)
    _say(2, "converting it to a Megatron checkpoint (tools/convert_hf_to_megatron.py)")
    megatron_dir = convert(hf_dir, work / "megatron")
    _say(3, "writing the prompt dataset and the run configuration")
    data = write_dataset(work / "data" / "train.jsonl")
    config_path = write_config(work, hf_dir, megatron_dir, data, args)
    _say(4, f"training: {args.tp} trainer processes (TP={args.tp}), dev server + sglang-router, "
            f"GRPO + {args.intervention}; config {config_path}")
    code = launch(config_path, args.tp)
    if code != 0:
        print(f"megarl demo: training failed (exit code {code}); logs in {work / 'run' / 'logs'}",
              file=sys.stderr)
        return code
    _say(5, "summary and plots")
    summarise(work / "run", time.monotonic() - started)
    return 0


def _say(step: int, text: str) -> None:
    print(f"[demo {step}/5] {text}", flush=True)


# --------------------------------------------------------------------------------------------
# The task and the model


def prompt_of(a: int, b: int) -> str:
    return f"{a}+{b}="


def answer_text(value: int | str) -> str:
    return f"\\boxed{{{value}}}"


def build_model(out: Path, *, seed: int, warm_start_steps: int) -> Path:
    """A 2-layer Qwen2 with tied embeddings that writes `\\boxed{n}`, trained on noisy answers."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from megarl.models.tiny import char_tokenizer

    if (out / "config.json").is_file():
        return out   # reuse: the model only depends on the seed and the warm start
    tokenizer = char_tokenizer(ALPHABET)
    config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        tie_word_embeddings=True, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=None, rope_theta=10000.0,
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    warm_start(model, tokenizer, steps=warm_start_steps, seed=seed)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    tmp = out.with_name(out.name + ".partial")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.replace(out)
    return out


def warm_start(model, tokenizer, *, steps: int, seed: int) -> None:
    """Teach the answer format, and the arithmetic only weakly: the answer digit is trained
    towards a distribution that puts WARM_START_CORRECT on the right sum and spreads the rest
    over the other digits, so the policy starts well below perfect but knows where to go.

    Training on that distribution directly (a soft target) rather than on sampled noisy labels
    takes a few hundred small steps instead of thousands.
    """
    import torch

    torch.manual_seed(seed)
    facts = [(a, b) for a in range(MAX_OPERAND + 1) for b in range(MAX_OPERAND + 1)]
    rows = [tokenizer(prompt_of(a, b)).input_ids + tokenizer(answer_text(a + b)).input_ids
            + [tokenizer.eos_token_id] for a, b in facts]
    ids = torch.tensor(rows)
    prompt_len = len(tokenizer(prompt_of(0, 0)).input_ids)
    digit_at = prompt_len + len(tokenizer(answer_text("")).input_ids) - 1  # inside the braces
    digits = torch.tensor(tokenizer.convert_tokens_to_ids([str(d) for d in range(2 * MAX_OPERAND + 1)]))
    target = torch.zeros(len(facts), len(tokenizer))
    target[:, digits] = (1 - WARM_START_CORRECT) / (len(digits) - 1)
    target[torch.arange(len(facts)), digits[[a + b for a, b in facts]]] = WARM_START_CORRECT
    # Positions t predict token t + 1: hard targets for the format, the soft one for the digit.
    hard = ids[:, 1:].clone()
    hard[:, : prompt_len - 1] = -100
    hard[:, digit_at - 1] = -100
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    model.train()
    for _ in range(steps):
        logp = torch.log_softmax(model(input_ids=ids).logits[:, :-1].float(), dim=-1)
        format_loss = torch.nn.functional.nll_loss(logp.transpose(1, 2), hard, ignore_index=-100)
        digit_loss = -(target * logp[:, digit_at - 1]).sum(-1).mean()
        optimizer.zero_grad()
        (format_loss + digit_loss).backward()
        optimizer.step()
    model.eval()


def write_dataset(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [{"prompt": prompt_of(a, b), "answer": str(a + b)}
            for a in range(MAX_OPERAND + 1) for b in range(MAX_OPERAND + 1)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# --------------------------------------------------------------------------------------------
# Conversion, configuration, launch


def convert(hf_dir: Path, out: Path) -> Path:
    if out.is_dir():
        return out
    tool = Path(__file__).resolve().parents[2] / "tools" / "convert_hf_to_megatron.py"
    if tool.is_file():
        command = [sys.executable, str(tool)]
    else:  # an installed wheel has no tools/: the tool is a thin wrapper around this entry point
        command = [sys.executable, "-c", "import sys; from megarl.checkpoint.convert import "
                   "main_hf_to_megatron, run_tool; sys.exit(run_tool(main_hf_to_megatron))"]
    subprocess.run(command + ["--hf-dir", str(hf_dir), "--output-dir", str(out)], check=True)
    return out


def demo_config(work: Path, hf_dir: Path, megatron_dir: Path, data: Path,
                args: argparse.Namespace) -> dict[str, Any]:
    quick = args.quick
    return {
        "model": {"hf_dir": str(hf_dir), "megatron_dir": str(megatron_dir), "dtype": "float32",
                  "make_vocab_size_divisible_by": 8},
        "parallel": {"tp": args.tp},
        "optimizer": {"lr": 2e-3, "weight_decay": 0.0, "clip_grad": 1.0,
                      "adam_beta2": 0.99},
        "rollout": {"backend": "dev", "num_servers": 1, "use_router": True, "base_port": 0,
                    "router_port": 0, "prompts_per_step": 8 if quick else 16,
                    "samples_per_prompt": 8, "temperature": 1.0, "max_new_tokens": 12,
                    "health_timeout_s": 300},
        "algorithm": {"advantage": "grpo", "loss_agg_mode": "token-mean",
                      "micro_batch_tokens": 4096},
        "entropy": {"intervention": args.intervention},
        "reward": {"function": "math", "num_workers": 2},
        "data": {"train_files": [str(data)], "apply_chat_template": False,
                 "max_prompt_tokens": 16},
        "checkpoint": {"save_interval": 0, "keep_last": 1},
        "logging": {"output_dir": str(work / "run"), "tensorboard": True},
        "trainer": {"num_steps": 4 if quick else args.steps, "seed": args.seed},
    }


def write_config(work: Path, hf_dir: Path, megatron_dir: Path, data: Path,
                 args: argparse.Namespace) -> Path:
    cfg = from_dict(demo_config(work, hf_dir, megatron_dir, data, args))
    path = work / "demo.yaml"
    path.write_text(to_yaml(cfg))
    return path


def launch(config_path: Path, tp: int) -> int:
    from megarl.rollout.servers import free_port

    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(tp),
               "--master-port", str(free_port()), "-m", "megarl.cli", "train",
               "--config", str(config_path)]
    return subprocess.run(command).returncode


# --------------------------------------------------------------------------------------------
# Results


def summarise(run_dir: Path, seconds: float) -> dict[str, Any]:
    from megarl.eval.figures import load_runs
    from megarl.eval.report import write_report
    from megarl.eval.table import text_table
    from megarl.metrics import read_metrics

    records = [r for r in read_metrics(run_dir) if "reward/mean" in r]
    if not records:
        raise RuntimeError(f"{run_dir}: no training step was logged")
    window = max(1, min(5, len(records) // 3))

    def mean(key: str, part: list[dict]) -> float:
        values = [r[key] for r in part if key in r]
        return sum(values) / len(values) if values else float("nan")

    first, last = records[:window], records[-window:]
    rows = []
    for key in ("reward/mean", "entropy/mean", "entropy/nucleus_mean", "response_length/mean",
                "time/step"):
        rows.append([key, f"{mean(key, first):.3f}", f"{mean(key, last):.3f}"])
    print(text_table(["metric", f"first {window} steps", f"last {window} steps"], rows))
    write_report(load_runs([run_dir]), run_dir, smooth_window=1)
    summary = {"steps": len(records), "seconds": round(seconds, 1),
               "reward_first": mean("reward/mean", first), "reward_last": mean("reward/mean", last),
               "entropy_first": mean("entropy/mean", first),
               "entropy_last": mean("entropy/mean", last)}
    (run_dir / "demo_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"{len(records)} steps in {seconds / 60:.1f} min; plots: {run_dir / 'report.png'}, "
          f"{run_dir / 'report.html'}; metrics: {run_dir / 'metrics.jsonl'}; "
          f"TensorBoard: tensorboard --logdir {run_dir / 'tensorboard'}")
    return summary
