"""Weight sync of a 1B-shaped model over gloo on CPU, against a raw broadcast of the same bytes.

A Qwen2-shaped model of about 1.1B parameters (hidden 2048, 16 layers, MLP 8192, vocabulary
32000, bfloat16; random weights written straight to safetensors, without transformers' init)
is served by one CPU dev server. The benchmark process plays trainer rank 0 and syncs it with
`BroadcastWeightSync` (pause, session, HTTP announcement per bucket, broadcast, load on the
server, version, resume). The baseline, timed in the same run in alternating rounds, is a raw
gloo broadcast of the same bytes in the same bucket-sized pieces to a process that only
receives. Both sync modes are measured: one broadcast per tensor (the default) and flattened
buckets (SGLang's flattened_bucket: a packing copy on each side). Reported: each sync's
throughput as a ratio of the raw broadcast's (target >= 0.7), the trainer's peak extra
resident memory during a sync, first sync included (target: one bucket plus the largest
tensor), and where the sync's time went (packing, broadcasts, waiting for the last reply).

    python benchmarks/bench_weight_sync.py [--json PATH] [--bucket-mb 256] [--rounds 3]
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import common  # noqa: E402
from megarl.config import RolloutConfig  # noqa: E402
from megarl.rollout.servers import RolloutServers, free_port  # noqa: E402
from megarl.sync.broadcast import BroadcastWeightSync  # noqa: E402
from megarl.sync.group import create_weight_update_group, destroy_weight_update_group  # noqa: E402

SHAPE = dict(vocab_size=32000, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
             num_attention_heads=16, num_key_value_heads=8, max_position_embeddings=4096,
             tie_word_embeddings=True)


def write_model(path: Path) -> dict[str, torch.Tensor]:
    """Random bfloat16 weights of the 1B shape, saved as a Hugging Face model directory."""
    from safetensors.torch import save_file
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(**SHAPE, torch_dtype="bfloat16")
    with torch.device("meta"):  # names and shapes without allocating or initialising
        names = [(n, p.shape) for n, p in Qwen2ForCausalLM(config).named_parameters()]
    gen = torch.Generator().manual_seed(0)
    weights = {n: (torch.rand(shape, generator=gen) * 0.02 - 0.01).to(torch.bfloat16)
               for n, shape in names}
    path.mkdir(parents=True, exist_ok=True)
    save_file(weights, str(path / "model.safetensors"), metadata={"format": "pt"})
    config.save_pretrained(path)
    return weights


def _receiver(port: int, sizes: list[int], rounds: int) -> None:
    """The raw baseline's other end: join, receive every piece, nothing else."""
    group = create_weight_update_group(master_address="127.0.0.1", master_port=port, rank=1,
                                       world_size=2, group_name="raw", backend="gloo",
                                       timeout_s=600)
    buffers = [torch.empty(size, dtype=torch.uint8) for size in sorted(set(sizes))]
    by_size = {b.numel(): b for b in buffers}
    for _ in range(rounds):
        for size in sizes:
            dist.broadcast(by_size[size], group_src=0, group=group)
        dist.barrier(group=group)
    destroy_weight_update_group(group)


class PeakRss:
    """Peak resident memory of this process while the block runs, sampled every 2 ms."""

    def __enter__(self) -> "PeakRss":
        self.process = psutil.Process()
        self.base = self.peak = self.process.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(0.002)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def extra(self) -> int:
        return self.peak - self.base


def piece_sizes(weights: dict[str, torch.Tensor], bucket_bytes: int) -> list[int]:
    """The byte sizes of the buckets the sync sends (same packing as iter_buckets)."""
    from megarl.sync.buckets import iter_buckets

    return [b.nbytes for b in iter_buckets(iter(weights.items()), bucket_bytes)]


MODES = {"flattened buckets": True, "one broadcast per tensor": False}


def measure(weights: dict[str, torch.Tensor], model_dir: Path, sizes: list[int],
            bucket_mb: float, rounds: int) -> dict:
    """Alternate raw broadcasts and both sync modes; round 0 warms up and is not timed."""
    port = free_port()
    helper = mp.get_context("spawn").Process(target=_receiver, args=(port, sizes, rounds + 1))
    helper.start()
    raw_group = create_weight_update_group(master_address="127.0.0.1", master_port=port, rank=0,
                                           world_size=2, group_name="raw", backend="gloo",
                                           timeout_s=600)
    send = torch.empty(max(sizes), dtype=torch.uint8)
    cfg = RolloutConfig(backend="dev", num_servers=1, use_router=False, base_port=0,
                        health_timeout_s=600, server_args={"dtype": "bfloat16", "max_batch_size": 1})
    out = {"raw": [], "sync": {m: [] for m in MODES}, "extra": {m: [] for m in MODES},
           "phases": {}}
    with RolloutServers(cfg, model_path=str(model_dir), log_dir=model_dir.parent / "logs") as servers:
        syncs = {m: BroadcastWeightSync(servers.server_urls, bucket_mb=bucket_mb, timeout_s=600,
                                        flattened=flat) for m, flat in MODES.items()}
        for r in range(rounds + 1):
            start = time.perf_counter()
            for size in sizes:
                dist.broadcast(send[:size], group_src=0, group=raw_group)
            dist.barrier(group=raw_group)
            if r:
                out["raw"].append(time.perf_counter() - start)
            for mode, sync in syncs.items():
                sync.connect()
                with PeakRss() as rss:
                    stats = sync.update(iter(weights.items()), version=f"r{r}")
                sync.close()
                out["extra"][mode].append(rss.extra)  # round 0 too: it allocates the buffers
                if r:
                    out["sync"][mode].append(stats.seconds)
                    out["phases"][mode] = stats.timings
            print(f"round {r}: {time.perf_counter() - start:.2f} s for all three transfers")
    helper.join(60)
    destroy_weight_update_group(raw_group)
    return out


def main() -> None:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--bucket-mb", type=float, default=256.0)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    bucket_bytes = int(args.bucket_mb * 2**20)
    root = Path(tempfile.mkdtemp(prefix="megarl-bench-sync-"))
    weights = write_model(root / "model")
    total = sum(t.numel() * t.element_size() for t in weights.values())
    largest = max(t.numel() * t.element_size() for t in weights.values())
    print(f"model: {sum(t.numel() for t in weights.values()) / 1e9:.2f}B parameters, "
          f"{total / 2**30:.2f} GiB bfloat16, largest tensor {largest / 2**20:.0f} MiB")
    sizes = piece_sizes(weights, bucket_bytes)
    m = measure(weights, root / "model", sizes, args.bucket_mb, args.rounds)

    raw = statistics.median(m["raw"])
    rows = [{"transfer": "raw gloo broadcast", "seconds": raw, "GB/s": total / raw / 1e9,
             "ratio": 1.0, "peak_extra_MiB": None, "pack_s": None, "broadcast_s": None,
             "reply_s": None}]
    for mode in MODES:
        synced, phases = statistics.median(m["sync"][mode]), m["phases"][mode]
        rows.append({"transfer": f"BroadcastWeightSync, {mode}", "seconds": synced,
                     "GB/s": total / synced / 1e9, "ratio": raw / synced,
                     "peak_extra_MiB": max(m["extra"][mode]) / 2**20, "pack_s": phases["pack"],
                     "broadcast_s": phases["broadcast"], "reply_s": phases["reply"]})
    common.print_table(rows, f"weight sync, {total / 2**30:.2f} GiB, {len(sizes)} buckets of "
                             f"<= {args.bucket_mb:g} MiB, median of {args.rounds} "
                             f"(pack/broadcast/reply: the last round's split)")
    target_extra = bucket_bytes + largest
    print(f"\ntargets: throughput ratio >= 0.7; peak extra memory <= bucket + largest tensor = "
          f"{target_extra / 2**20:.0f} MiB")
    common.write_json(args.json, "weight_sync", {
        "model_bytes": total, "num_buckets": len(sizes), "bucket_bytes": bucket_bytes,
        "largest_tensor_bytes": largest, "target_extra_bytes": target_extra,
        "raw_seconds": m["raw"], "sync_seconds": m["sync"], "peak_extra_bytes": m["extra"],
        "rows": rows})


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
