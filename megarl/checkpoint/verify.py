"""`megarl verify-conversion`: does a Megatron checkpoint compute what its HF source computes?

Runs the Hugging Face transformers model and the Megatron model (built by megarl at the given
TP/PP, weights from the distributed checkpoint) on the same prompts, and prints the largest
absolute logit difference and how often the two agree on the top-1 token. Exits with status
1 past tolerance. With --tp/--pp above 1 it starts the tp x pp gloo processes itself.

    megarl verify-conversion --hf-dir Qwen2.5-Math-7B --megatron-dir ckpt/ --tp 2 --pp 2

Prompts are tokenized with the HF directory's tokenizer; without one (tiny test models),
random token ids are used.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path
from typing import Optional, Sequence

import torch

from megarl.checkpoint.manifest import read_manifest, shape_differences, shape_from_manifest
from megarl.config import ModelConfig, ParallelConfig
from megarl.models.hf import shape_from_hf_dir
from megarl.models.shape import ModelShape

DEFAULT_PROMPTS = (
    "Find all real numbers x such that x^2 - 5x + 6 = 0. Let's think step by step.",
    "The sum of the first 100 positive integers is",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
)
DEFAULT_ATOL = {"float32": 1e-2, "bfloat16": 1.0}
DEFAULT_MIN_TOP1 = {"float32": 0.99, "bfloat16": 0.9}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--hf-dir", required=True, help="the Hugging Face source checkpoint")
    parser.add_argument("--megatron-dir", required=True, help="the converted torch_dist checkpoint")
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel size to run at")
    parser.add_argument("--pp", type=int, default=1, help="pipeline-parallel size to run at")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--prompt", action="append", default=None,
                        help="a prompt (repeatable); default: a few math/code prompts")
    parser.add_argument("--num-random-tokens", type=int, default=24,
                        help="prompt length when the HF directory has no tokenizer")
    parser.add_argument("--atol", type=float, default=None,
                        help="largest acceptable |logit difference| "
                        f"(default {DEFAULT_ATOL['float32']} float32, "
                        f"{DEFAULT_ATOL['bfloat16']} bfloat16)")
    parser.add_argument("--min-top1", type=float, default=None,
                        help="smallest acceptable top-1 agreement in [0, 1] (default "
                        f"{DEFAULT_MIN_TOP1['float32']} float32, "
                        f"{DEFAULT_MIN_TOP1['bfloat16']} bfloat16)")


def run(args: argparse.Namespace) -> int:
    """Exit status 0: within tolerance; 1: past it; 2: the inputs cannot be compared."""
    try:
        shape, _ = shape_from_hf_dir(args.hf_dir)
        _check_manifest(shape, args.hf_dir, args.megatron_dir)
        prompts = make_prompts(args.hf_dir, args.prompt, shape.vocab_size,
                               args.num_random_tokens)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    reference = hf_logits(args.hf_dir, prompts, args.dtype)
    ours = run_megatron(args.megatron_dir, prompts, shape, ParallelConfig(tp=args.tp, pp=args.pp),
                        args.dtype)
    max_diff, agree, total = compare(reference, ours)
    atol = args.atol if args.atol is not None else DEFAULT_ATOL[args.dtype]
    min_top1 = args.min_top1 if args.min_top1 is not None else DEFAULT_MIN_TOP1[args.dtype]
    ok = max_diff <= atol and agree / total >= min_top1
    print(f"prompts: {len(prompts)}, tokens: {total}, tp={args.tp} pp={args.pp} {args.dtype}")
    print(f"max |logit difference|: {max_diff:.3e} (tolerance {atol:g})")
    print(f"top-1 agreement: {agree / total:.2%} ({agree}/{total}; required {min_top1:.0%})")
    print("OK" if ok else "FAILED: the Megatron checkpoint does not reproduce the HF model")
    return 0 if ok else 1


def _check_manifest(shape: ModelShape, hf_dir, megatron_dir) -> None:
    manifest = read_manifest(megatron_dir)
    if manifest is not None:
        differences = shape_differences(shape_from_manifest(manifest), shape)
        if differences:
            raise ValueError(f"{megatron_dir} was not converted from a model like {hf_dir}: "
                             + "; ".join(differences))


def make_prompts(hf_dir, texts: Optional[Sequence[str]], vocab_size: int,
                 num_random_tokens: int) -> list[torch.Tensor]:
    """Token ids of the prompts (random ids when the HF directory has no tokenizer)."""
    has_tokenizer = any((Path(hf_dir) / f).is_file()
                        for f in ("tokenizer.json", "tokenizer.model", "vocab.json"))
    if not has_tokenizer:
        if texts:
            raise ValueError(f"{hf_dir} has no tokenizer to encode --prompt with")
        generator = torch.Generator().manual_seed(0)
        return [torch.randint(0, vocab_size, (num_random_tokens,), generator=generator)
                for _ in range(2)]
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    return [torch.tensor(tokenizer(t)["input_ids"], dtype=torch.long)
            for t in (texts or DEFAULT_PROMPTS)]


def hf_logits(hf_dir, prompts: Sequence[torch.Tensor], dtype: str) -> list[torch.Tensor]:
    """Logits [tokens, vocab] of the transformers model for each prompt, in float32."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=getattr(torch, dtype))
    model.eval()
    with torch.no_grad():
        return [model(p[None]).logits[0].float() for p in prompts]


def compare(reference: Sequence[torch.Tensor], ours: Sequence[torch.Tensor]):
    """(max |difference|, top-1 agreements, tokens) over all prompts."""
    max_diff, agree, total = 0.0, 0, 0
    for ref, out in zip(reference, ours, strict=True):
        if ref.shape != out.shape:
            raise ValueError(f"logits of shape {tuple(out.shape)} vs HF {tuple(ref.shape)}")
        max_diff = max(max_diff, (ref - out).abs().max().item())
        agree += int((ref.argmax(-1) == out.argmax(-1)).sum())
        total += ref.shape[0]
    return max_diff, agree, total


# --------------------------------------------------------------------------------------------
# The Megatron side


def model_logits(chunks, prompts: Sequence[torch.Tensor], ctx, vocab_size: int):
    """Full-vocabulary logits [tokens, vocab_size] of the live model for each prompt, in float32.

    Collective over the model-parallel ranks; the result is on the last pipeline stage's
    tensor-parallel rank 0 (None elsewhere).
    """
    import torch.distributed as dist
    from megatron.core.pipeline_parallel import get_forward_backward_func

    def loss_func(output, non_loss_data=False):
        if ctx.tp > 1:  # each TP rank holds a slice of the (padded) vocabulary
            shards = [torch.empty_like(output) for _ in range(ctx.tp)]
            dist.all_gather(shards, output.contiguous(), group=ctx.tp_group)
            output = torch.cat(shards, dim=-1)
        return output[..., :vocab_size].float().cpu()

    def forward_step(data_iterator, model):
        tokens = next(data_iterator).to(ctx.device)
        positions = torch.arange(tokens.shape[1], device=ctx.device)[None]
        return model(tokens, positions, None), loss_func

    results = []
    for model in chunks:
        model.eval()
    with torch.no_grad():
        for prompt in prompts:
            out = get_forward_backward_func()(
                forward_step_func=forward_step, data_iterator=iter([prompt[None]]),
                model=chunks[0], num_microbatches=1, seq_length=prompt.numel(),
                micro_batch_size=1, forward_only=True, collect_non_loss_data=True)
            results.append(out[0][0] if ctx.is_last_stage else None)
    return results if ctx.is_last_stage and ctx.tp_rank == 0 else None


def megatron_logits(megatron_dir, prompts, shape: ModelShape, parallel: ParallelConfig,
                    dtype: str = "float32"):
    """Build the model at `parallel` on this rank, load the checkpoint, return `model_logits`.

    Every rank of a world of tp x pp processes calls it (torch.distributed may already be up).
    """
    from megarl.checkpoint.model_io import load_megatron_checkpoint
    from megarl.models.builder import build_model_chunks
    from megarl.parallel import init_distributed

    model_cfg = ModelConfig(hf_dir="unused", dtype=dtype)
    ctx = init_distributed(parallel, shape,
                           vocab_divisible_by=model_cfg.make_vocab_size_divisible_by)
    chunks = build_model_chunks(shape, model_cfg, parallel, ctx)
    load_megatron_checkpoint(chunks, megatron_dir, ctx)
    return model_logits(chunks, prompts, ctx, shape.vocab_size)


def run_megatron(megatron_dir, prompts, shape: ModelShape, parallel: ParallelConfig,
                 dtype: str) -> list[torch.Tensor]:
    """`megatron_logits` in tp x pp freshly started processes; the logits come back.

    Separate processes even for one rank, so that the caller's process keeps no
    torch.distributed or Megatron state.
    """
    import torch.multiprocessing as mp

    world = parallel.tp * parallel.pp
    with tempfile.TemporaryDirectory(prefix="megarl-verify-") as tmp:
        result = Path(tmp) / "logits.pt"
        mp.start_processes(
            _worker, nprocs=world, join=True, start_method="spawn",
            args=(world, _free_port(), str(megatron_dir), list(prompts), shape, parallel, dtype,
                  str(result)),
        )
        if not result.is_file():
            raise RuntimeError("the Megatron processes finished without producing logits")
        return torch.load(result)


def _worker(rank, world, port, megatron_dir, prompts, shape, parallel, dtype, result) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      LOCAL_RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    from megarl.parallel import teardown

    try:
        logits = megatron_logits(megatron_dir, prompts, shape, parallel, dtype)
        if logits is not None:
            torch.save(logits, result)
    finally:
        teardown()


def _free_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="megarl verify-conversion", description=__doc__)
    add_arguments(parser)
    sys.exit(run(parser.parse_args()))
