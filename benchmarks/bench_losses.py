"""Cost of one loss forward + backward, from logits, for each entropy intervention vs plain GRPO.

Two gloo processes hold the two vocab shards of one micro-batch (TP = 2, CPU). Each variant
runs the vocab-parallel ops with the statistics its objective requests, the policy objective,
and the backward to the logits shard. Variants are timed in interleaved rounds (one call of
each per round, the order rotated between rounds) so that noise on a shared machine hits them
alike; the table reports each
median relative to plain GRPO (`none`: log-probs plus the entropy every objective computes
for its metrics). The logits are peaked like a language model's: most rows put most mass on
a handful of tokens, so nucleus sizes stay small, as in RL rollouts. `siren top_k=256` lowers
`entropy.nucleus_top_k` (candidates per rank, spec default 1024; the result is exact either
way) to show what the nucleus selection's all-gather costs. `loss_only_ms` is the objective
alone on precomputed statistics, i.e. what `megarl.losses` adds on top of `megarl.ops`.

    python benchmarks/bench_losses.py [--json PATH] [--tokens 2048] [--vocab 32768]
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import statistics
import sys
import time
from pathlib import Path
from queue import Empty

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import common  # noqa: E402
from megarl.rollout.servers import free_port  # noqa: E402

VARIANTS = [
    ("grpo (none)", "none", {}),
    ("entropy_bonus", "entropy_bonus", {}),
    ("clip_cov", "clip_cov", {"clip_cov_ratio": 2e-3, "cov_lb": -5.0}),
    ("kl_cov", "kl_cov", {"kl_cov_ratio": 2e-3}),
    ("siren", "siren", {}),
    ("siren top_k=256", "siren", {"nucleus_top_k": 256}),
    ("aer", "aer", {"aer_alpha_init": 1e-3}),
]
RESPONSE_TOKENS = 256


def peaked_logits(num_tokens: int, vocab: int, generator: torch.Generator) -> torch.Tensor:
    """[T, V] Zipf-shaped logits: token of rank k gets -s log k (+ small noise), the ranks in a
    random order per row, the sharpness s in [1.3, 3.5] per row. Mean entropy about 1.5 nats,
    nucleus (p = 0.8) of a few tokens, at most ~100: what RL rollouts of LLMs look like."""
    sharpness = 1.3 + 2.2 * torch.rand(num_tokens, 1, generator=generator)
    ranks = torch.rand(num_tokens, vocab, generator=generator).argsort(dim=-1).float() + 1.0
    noise = 0.3 * torch.randn(num_tokens, vocab, generator=generator)
    return -sharpness * torch.log(ranks) + noise


def build_case(num_tokens: int, vocab: int, rank: int, tp: int):
    """This rank's logits shard, the targets and the loss inputs (identical on every rank)."""
    from megarl.losses import MicroBatch

    g = torch.Generator().manual_seed(0)
    full = peaked_logits(num_tokens, vocab, g)
    probs = torch.softmax(full, dim=-1)
    targets = torch.multinomial(probs, 1, generator=g).squeeze(1)
    lp = torch.log_softmax(full, dim=-1).gather(1, targets[:, None]).squeeze(1)
    num_seqs = num_tokens // RESPONSE_TOKENS
    seq_ids = torch.arange(num_tokens) // RESPONSE_TOKENS
    rewards = (torch.rand(num_seqs, generator=g) > 0.5).float()
    adv = (rewards - rewards.mean())[seq_ids]
    width = vocab // tp
    shard = full[:, rank * width:(rank + 1) * width].contiguous()
    batch = MicroBatch(mask=torch.ones(num_tokens, dtype=torch.bool), seq_ids=seq_ids,
                       num_seqs=num_seqs, advantages=adv,
                       old_log_probs=lp + 0.05 * torch.randn(num_tokens, generator=g),
                       seq_group_ids=torch.arange(num_seqs) // 4, seq_rewards=rewards)
    return shard, targets, batch


def one_step(objective, shard, targets, batch, tp_group, step):
    from megarl.ops import vocab_parallel_token_stats

    logits = shard.detach().requires_grad_()
    stats = vocab_parallel_token_stats(logits, targets, tp_group=tp_group,
                                       **objective.stats_kwargs)
    loss, _ = objective(stats, batch, step)
    loss.backward()
    return stats


def loss_only(objective, stats, batch, step) -> None:
    """The objective alone (forward + backward to the token statistics): the losses' cost."""
    leaves = dataclasses.replace(stats, **{
        name: getattr(stats, name).detach().requires_grad_()
        for name in ("log_probs", "entropy", "nucleus_entropy")
        if getattr(stats, name) is not None})
    loss, _ = objective(leaves, batch, step)
    loss.backward()


def prepare(name, settings, shard, targets, batch, tp_group):
    """The objective of a variant and its own copy of the batch with the old-pass statistics,
    past its first iteration (anchors measured)."""
    from megarl.config import AlgorithmConfig, EntropyConfig, RolloutConfig
    from megarl.losses import build_loss
    from megarl.ops import vocab_parallel_token_stats

    objective = build_loss(AlgorithmConfig(), EntropyConfig(intervention=name, **settings),
                           RolloutConfig(max_new_tokens=RESPONSE_TOKENS), seed=0)
    with torch.no_grad():
        old = vocab_parallel_token_stats(shard, targets, tp_group=tp_group,
                                         **objective.stats_kwargs)
    batch = dataclasses.replace(batch, old_entropy=old.entropy,
                                old_nucleus_entropy=old.nucleus_entropy)
    objective.begin_iteration([batch])
    return objective, batch, old


def timed_step(objective, batch, tp_group, run) -> float:
    """Wall time of `run(step)` inside one optimizer step, both ranks starting together."""
    step = objective.begin_step([batch])
    dist.barrier(tp_group)
    start = time.perf_counter()
    run(step)
    dist.barrier(tp_group)
    elapsed = time.perf_counter() - start
    objective.end_step(step)
    return elapsed


def worker(rank: int, world: int, port: int, args, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=600))
    tp_group = dist.new_group(list(range(world)))
    shard, targets, batch = build_case(args["tokens"], args["vocab"], rank, world)
    prepared = {label: prepare(name, settings, shard, targets, batch, tp_group)
                for label, name, settings in VARIANTS}
    times = {kind: {label: [] for label in prepared} for kind in ("total", "loss")}
    labels = list(prepared)
    for round_index in range(args["rounds"] + 1):  # round 0 warms up
        # rotate the order each round: no variant always runs first (or after SIREN's peak)
        shift = round_index % len(labels)
        for label in labels[shift:] + labels[:shift]:
            objective, batch, old = prepared[label]
            runs = {"total": lambda step: one_step(objective, shard, targets, batch, tp_group, step),
                    "loss": lambda step: loss_only(objective, old, batch, step)}
            for kind, run in runs.items():
                elapsed = timed_step(objective, batch, tp_group, run)
                if round_index:
                    times[kind][label].append(elapsed)
    if rank == 0:
        old = prepared["siren"][2]
        queue.put({"times": times, "nucleus_size": float(old.nucleus_size.float().mean()),
                   "entropy": float(old.entropy.mean())})
    dist.destroy_process_group()


def main() -> None:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=2048, help="tokens in the micro-batch")
    p.add_argument("--vocab", type=int, default=32768, help="vocab size (split over 2 ranks)")
    p.add_argument("--rounds", type=int, default=5, help="timed calls of each variant")
    args = p.parse_args()
    port = free_port()
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    settings = {"tokens": args.tokens, "vocab": args.vocab, "rounds": args.rounds}
    procs = [ctx.Process(target=worker, args=(r, 2, port, settings, queue)) for r in range(2)]
    for proc in procs:
        proc.start()
    report = None
    while report is None:
        try:
            report = queue.get(timeout=5)
        except Empty:
            if any(proc.exitcode not in (None, 0) for proc in procs):
                for proc in procs:
                    proc.kill()
                raise SystemExit("a benchmark process failed (its traceback is above)")
    for proc in procs:
        proc.join()
    total, losses = report["times"]["total"], report["times"]["loss"]
    rows, base = [], statistics.median(total["grpo (none)"])
    for label, _, _ in VARIANTS:
        median = statistics.median(total[label])
        rows.append({"variant": label, "median_s": median, "vs_grpo": median / base,
                     "loss_only_ms": 1e3 * statistics.median(losses[label]),
                     "ops_share": 1 - statistics.median(losses[label]) / median})
    common.print_table(rows, title=(
        f"loss forward+backward from logits, TP=2 (gloo, CPU), {args.tokens} tokens x "
        f"{args.vocab} vocab; mean nucleus size (p=0.8) {report['nucleus_size']:.1f}, "
        f"mean entropy {report['entropy']:.2f}"))
    siren = next(r["vs_grpo"] for r in rows if r["variant"] == "siren")
    print(f"\nSIREN / GRPO = {siren:.2f} (target <= 2)")
    common.write_json(args.json, "bench_losses", {
        "tokens": args.tokens, "vocab": args.vocab, "tp": 2, "rounds": args.rounds,
        "mean_nucleus_size": report["nucleus_size"], "mean_entropy": report["entropy"],
        "rows": rows})


if __name__ == "__main__":
    main()
