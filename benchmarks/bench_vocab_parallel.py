"""Vocab-parallel log-prob + entropy (+ nucleus entropy): fused megarl ops vs the usual ways.

    python benchmarks/bench_vocab_parallel.py --json out.json

Variants, all forward + backward of sum(w1 * log_prob + w2 * entropy) with random upstream
weights, side by side in one run (round-robin over repeats, the median reported):
  fused          megarl.ops.vocab_parallel_token_stats(log_probs, entropy): one pass, chunked
  gather_full    (a) all-gather the vocab shards, compute on the full logits in float32
  megatron_sep   (b) what frameworks do today: Megatron's vocab_parallel_cross_entropy on a
                 clone (it overwrites float32 input) plus a separate vocab-parallel entropy
                 pass that keeps the softmax for backward (as in verl's Megatron backend)
  entropy        megarl entropy alone;  nucleus: megarl nucleus entropy alone (p, K below)

CPU: TP=2 over gloo in two spawned processes (one thread each), float32 logits.
GPU (when CUDA is present): TP=1 on one device, bfloat16 logits, with the bandwidth floor.

Peak memory. On GPU: torch.cuda.max_memory_allocated over the call, minus what was
allocated before it. On CPU, which has no allocator statistics, the profiler's memory events
(`profile_memory=True`) record every allocation and free made through torch's CPU allocator
with its size; their running sum in time order, from the start of the call, peaks at the
call's peak extra allocation. The logits' gradient (T x V_loc in the input dtype) is the
call's required output and is reported apart; "extra" is the peak minus that gradient.
Timings are measured in separate runs from memory (the profiler slows calls down).
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist

if __package__ in (None, ""):  # run as a script: make `benchmarks` and `megarl` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import parser, print_table, write_json  # noqa: E402
from megarl.ops import (  # noqa: E402
    default_chunk_size,
    vocab_parallel_entropy,
    vocab_parallel_nucleus_entropy,
    vocab_parallel_token_stats,
)
from megarl.rollout.servers import free_port  # noqa: E402

H200_BYTES_PER_S = 4.8e12  # HBM3e peak, for the bandwidth floor


# ------------------------------------------------------------------------------------------
# Inputs and the variants


def make_inputs(tokens, vocab, tp, rank, dtype, device, seed=0, flat_share=0.02):
    """This rank's shard of LLM-like logits, global targets and upstream weights.

    Rows: a bulk of N(0, 1.5^2) logits plus a head of 1..40 ids raised by 12..18 (a nucleus
    of a few to a few dozen ids, like a language model's); `flat_share` of the rows are nearly
    flat (N(0, 0.3^2)), whose nucleus holds most of the vocab and needs the exact search.
    """
    dev = torch.device(device)
    g = torch.Generator(device=dev).manual_seed(seed)
    kw = dict(generator=g, device=dev)
    full = torch.randn(tokens, vocab, **kw) * 1.5
    head_ids = torch.randint(0, vocab, (tokens, 40), **kw)
    head_len = torch.randint(1, 41, (tokens, 1), **kw)
    boost = (12 + 6 * torch.rand(tokens, 40, **kw)) * (torch.arange(40, device=dev) < head_len)
    full.scatter_add_(1, head_ids, boost)
    flat = (torch.rand(tokens, **kw) < flat_share).nonzero().squeeze(1)
    full[flat] = torch.randn(flat.numel(), vocab, **kw) * 0.3
    v_loc = vocab // tp
    logits = full[:, rank * v_loc:(rank + 1) * v_loc].to(dtype=dtype).contiguous()
    del full
    targets = torch.randint(0, vocab, (tokens,), **kw)
    weights = torch.randn(2, tokens, **kw)
    return logits, targets, weights


def fused(logits, targets, w, group, chunk):
    x = logits.detach().requires_grad_(True)
    s = vocab_parallel_token_stats(x, targets, tp_group=group, entropy=True, chunk_size=chunk)
    (w[0] * s.log_probs + w[1] * s.entropy).sum().backward()
    return x.grad


def entropy_only(logits, targets, w, group, chunk):
    x = logits.detach().requires_grad_(True)
    (w[1] * vocab_parallel_entropy(x, group, chunk_size=chunk)).sum().backward()
    return x.grad


def nucleus_only(logits, targets, w, group, chunk, top_p=0.8, top_k=1024):
    x = logits.detach().requires_grad_(True)
    hp = vocab_parallel_nucleus_entropy(x, top_p, group, top_k=top_k, chunk_size=chunk)
    (w[1] * hp).sum().backward()
    return x.grad


def gather_full(logits, targets, w, group, chunk):
    """(a): every rank gathers all shards and computes on [T, V] in float32."""
    x = logits.detach().requires_grad_(True)
    if group is None:
        full = x
    else:
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x.detach().contiguous(), group=group)
        parts[dist.get_rank(group)] = x  # the gradient flows back into this rank's shard only
        full = torch.cat(parts, dim=-1)
    logp = torch.log_softmax(full.float(), dim=-1)
    lp = logp.gather(1, targets.unsqueeze(1)).squeeze(1)
    h = -(logp.exp() * logp).sum(-1)
    (w[0] * lp + w[1] * h).sum().backward()
    return x.grad


class _SeparateEntropy(torch.autograd.Function):
    """The common vocab-parallel entropy pass: keeps float32 logits and softmax for backward."""

    @staticmethod
    def forward(ctx, logits, group):
        z = logits.float()
        m = z.amax(-1)
        if group is not None:
            dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
        e = torch.exp(z - m.unsqueeze(1))
        s = e.sum(-1)
        if group is not None:
            dist.all_reduce(s, group=group)
        p = e / s.unsqueeze(1)
        pz = (p * z).sum(-1)
        if group is not None:
            dist.all_reduce(pz, group=group)
        ctx.save_for_backward(z, p, pz)
        ctx.dtype = logits.dtype
        return m + torch.log(s) - pz

    @staticmethod
    def backward(ctx, g):
        z, p, pz = ctx.saved_tensors
        return (g.unsqueeze(1) * p * (pz.unsqueeze(1) - z)).to(ctx.dtype), None


def megatron_separate(logits, targets, w, group, chunk):
    """(b): Megatron cross-entropy on a clone plus a separate entropy pass."""
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    x = logits.detach().requires_grad_(True)
    lp = -vocab_parallel_cross_entropy(x.clone(), targets)
    h = _SeparateEntropy.apply(x, group)
    (w[0] * lp + w[1] * h).sum().backward()
    return x.grad


VARIANTS = {"fused": fused, "gather_full": gather_full, "megatron_sep": megatron_separate,
            "entropy": entropy_only, "nucleus": nucleus_only}


# ------------------------------------------------------------------------------------------
# Measurement


def time_variants(calls: dict, repeat: int, group) -> dict:
    """Median seconds per variant, round-robin; slowest rank's time of each call."""
    for call in calls.values():  # warm-up
        call()
    samples = {name: [] for name in calls}
    for _ in range(repeat):
        for name, call in calls.items():
            _sync(group)
            start = time.perf_counter()
            call()
            _sync(group, device_only=True)
            took = torch.tensor([time.perf_counter() - start], dtype=torch.float64)
            if group is not None:
                dist.all_reduce(took, op=dist.ReduceOp.MAX, group=group)
            samples[name].append(float(took))
    return {name: sorted(s)[len(s) // 2] for name, s in samples.items()}


def _sync(group, device_only=False):
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    if group is not None and not device_only:
        dist.barrier(group=group)


def peak_cpu_bytes(fn) -> int:
    """Peak of the running sum of CPU allocations minus frees while `fn` runs (profiler)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [(e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
              if e.name() == "[memory]"]
    running = peak = 0
    for _, nbytes in sorted(events, key=lambda ev: ev[0]):
        running += nbytes
        peak = max(peak, running)
    return peak


def peak_cuda_bytes(fn) -> int:
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


def measure(cfg, rank, dtype, device, group, peak_fn) -> dict:
    """Times and peak extra memory of every variant on this rank, plus two side figures:
    the nucleus when every row is flat (all take the exact search), and the fused op's
    memory at a 4x larger chunk (it should grow 4x: memory follows the chunk, not T)."""
    logits, targets, w = make_inputs(cfg["tokens"], cfg["vocab"], cfg["tp"], rank, dtype, device)
    chunk, repeat = cfg["chunk"], cfg["repeat"]
    calls = {n: partial(f, logits, targets, w, group, chunk) for n, f in VARIANTS.items()}
    times = time_variants(calls, repeat, group)
    grad_bytes = logits.numel() * logits.element_size()
    memory = {n: peak_fn(c) - grad_bytes for n, c in calls.items()}
    big_chunk = peak_fn(partial(fused, logits, targets, w, group, 4 * chunk)) - grad_bytes
    result = {"seconds": times, "peak_extra_bytes": memory,
              "fused_peak_extra_bytes_4x_chunk": big_chunk,
              "nucleus_fallback_rows": _fallback_rows(logits, group, chunk)}
    del logits, calls  # free the logits before the second set is made
    flat, targets, w = make_inputs(cfg["tokens"], cfg["vocab"], cfg["tp"], rank, dtype, device,
                                   flat_share=1.0)
    result["all_flat_seconds"] = time_variants(
        {n: partial(f, flat, targets, w, group, chunk)
         for n, f in (("entropy", entropy_only), ("nucleus", nucleus_only))},
        max(1, repeat // 2), group)
    return result


# ------------------------------------------------------------------------------------------
# CPU at TP=2 (spawned gloo ranks) and GPU at TP=1


def _cpu_rank(rank, size, port, cfg, out_path):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=size)
    from megarl import platform

    platform.apply()
    from megatron.core import parallel_state

    parallel_state.initialize_model_parallel(tensor_model_parallel_size=size)
    group = parallel_state.get_tensor_model_parallel_group()
    result = measure(cfg, rank, torch.float32, "cpu", group, peak_cpu_bytes)
    if rank == 0:
        torch.save(result, out_path)
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


def _fallback_rows(logits, group, chunk, top_p=0.8, top_k=1024):
    """Share of rows whose nucleus is larger than the top-K candidates (the exact search)."""
    s = vocab_parallel_token_stats(logits, None, tp_group=group, log_probs=False,
                                   nucleus_top_p=top_p, nucleus_top_k=top_k, chunk_size=chunk)
    return float((s.nucleus_size > top_k).double().mean())


def run_cpu(cfg: dict) -> dict:
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "rank0.pt")
        mp.spawn(_cpu_rank, args=(cfg["tp"], free_port(), cfg, out), nprocs=cfg["tp"], join=True)
        return torch.load(out)


def run_gpu(cfg: dict) -> dict:
    """One device, TP=1: the same variants, plus achieved bytes/s against the HBM floor."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    dist.init_process_group("nccl", rank=0, world_size=1)
    from megatron.core import parallel_state

    parallel_state.initialize_model_parallel(tensor_model_parallel_size=1)
    result = measure(cfg, 0, torch.bfloat16, "cuda", None, peak_cuda_bytes)
    # one read of the bf16 logits forward; one read and one gradient write backward
    floor_bytes = 3 * cfg["tokens"] * cfg["vocab"] * 2
    result["floor_seconds"] = floor_bytes / H200_BYTES_PER_S
    result["fused_bytes_per_s"] = floor_bytes / result["seconds"]["fused"]
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()
    return result


# ------------------------------------------------------------------------------------------


def summarize(where: str, cfg: dict, r: dict) -> tuple[list[dict], dict]:
    """Table rows and the target checks of one run."""
    t, mem = r["seconds"], r["peak_extra_bytes"]
    v_loc = cfg["vocab"] // cfg["tp"]
    chunk_bytes = min(cfg["chunk"], cfg["tokens"]) * v_loc * 4
    rows = [{"where": where, "variant": n, "seconds": t[n],
             "vs_megatron_sep": t[n] / t["megatron_sep"], "peak_extra_MiB": mem[n] / 2**20,
             "extra/(chunk*V_loc*4)": mem[n] / chunk_bytes}
            for n in t]
    per_token_allowance = 256 * cfg["tokens"]  # the O(T) term: a few dozen [T] vectors
    checks = {
        "fused_vs_megatron_sep": t["fused"] / t["megatron_sep"],
        "fused_vs_megatron_sep_target": 0.7,
        "fused_peak_extra_over_chunk_buffer": (mem["fused"] - per_token_allowance) / chunk_bytes,
        "fused_peak_extra_target": 1.25,
        "nucleus_vs_entropy": t["nucleus"] / t["entropy"],
        "nucleus_vs_entropy_target": 2.0,
    }
    if "fused_bytes_per_s" in r:
        checks["fused_bytes_per_s"] = r["fused_bytes_per_s"]
        checks["fused_fraction_of_hbm_floor"] = r["floor_seconds"] / t["fused"]
    checks["nucleus_fallback_row_share"] = r["nucleus_fallback_rows"]
    flat = r["all_flat_seconds"]
    checks["all_rows_flat_nucleus_vs_entropy"] = flat["nucleus"] / flat["entropy"]
    checks["fused_peak_extra_4x_chunk_over_its_buffer"] = (
        r["fused_peak_extra_bytes_4x_chunk"] / (4 * chunk_bytes))
    return rows, checks


def main(argv=None) -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--vocab", type=int, default=32768)
    p.add_argument("--chunk", type=int, default=None,
                   help="chunk size (tokens) of the megarl ops; default: the ops' default")
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--gpu-tokens", type=int, default=16384)
    p.add_argument("--gpu-vocab", type=int, default=152064)
    p.add_argument("--gpu-chunk", type=int, default=None)
    p.add_argument("--no-gpu", action="store_true")
    args = p.parse_args(argv)
    cfg = dict(tokens=args.tokens, vocab=args.vocab, repeat=args.repeat, tp=2,
               chunk=args.chunk or default_chunk_size(args.vocab // 2, torch.device("cpu")))
    runs = {"cpu_tp2": (cfg, run_cpu(cfg))}
    if torch.cuda.is_available() and not args.no_gpu:
        chunk = args.gpu_chunk or default_chunk_size(args.gpu_vocab, torch.device("cuda"))
        gcfg = dict(tokens=args.gpu_tokens, vocab=args.gpu_vocab, chunk=chunk,
                    repeat=args.repeat, tp=1)
        runs["gpu_tp1"] = (gcfg, run_gpu(gcfg))
    rows, record = [], {}
    for where, (c, r) in runs.items():
        table, checks = summarize(where, c, r)
        rows += table
        record[where] = {"config": c, "raw": r, "checks": checks}
    print_table(rows, "vocab-parallel log-prob + entropy, forward + backward")
    for where, rec in record.items():
        checks = [{"check": k, "value": v} for k, v in rec["checks"].items()]
        print_table(checks, f"targets: {where}")
    write_json(args.json, "bench_vocab_parallel", record)


if __name__ == "__main__":
    main()
