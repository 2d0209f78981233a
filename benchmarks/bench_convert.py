"""Conversion time and peak memory for a 1B-shaped model (Llama-3.2-1B dimensions, bfloat16).

    python benchmarks/bench_convert.py [--json PATH] [--layers N] [--workdir DIR]

Random weights are written straight to safetensors from the tensor list the llama adapter
expects (no transformers model is materialised). Each conversion runs as a user would run it,
in a child process (`tools/convert_*.py`), while this process samples the resident memory of
the child and its descendants every 20 ms. The peak is reported against a child that only
imports what the converter imports (the interpreter baseline), and the difference is compared
with the size of the largest unit the converter streams (one decoder layer, or the embedding)
and with the whole model: streaming means the first ratio stays near 1 and far from the
whole-model size.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import parser, print_table, write_json  # noqa: E402
from megarl.checkpoint.adapters import adapter_for  # noqa: E402
from megarl.checkpoint.hf_io import ShardedSafetensorsWriter  # noqa: E402
from megarl.models.hf import shape_from_hf_config  # noqa: E402
from megarl.models.tiny import tiny_config  # noqa: E402

GIB = 2**30
# Llama-3.2-1B: 16 layers, hidden 2048, 32 heads / 8 KV heads, MLP 8192, vocab 128256, tied.
ONE_B = dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
             num_attention_heads=32, num_key_value_heads=8, head_dim=64,
             tie_word_embeddings=True, dtype="bfloat16")
BASELINE = ("import megarl.checkpoint.convert, megatron.core.dist_checkpointing; "
            "from megarl import platform; platform.apply(); import time; time.sleep(1)")


def write_random_checkpoint(out: Path, layers: int) -> dict:
    """A random bfloat16 llama checkpoint of ONE_B's shape; returns sizes for the report."""
    config = tiny_config("llama", **{**ONE_B, "num_hidden_layers": layers})
    config.save_pretrained(out)
    shape = shape_from_hf_config(config)
    expected = adapter_for("llama").hf_shapes(shape)
    plan = [(name, tensor_shape, torch.bfloat16) for name, tensor_shape in expected.items()]
    writer = ShardedSafetensorsWriter(out, plan, max_shard_bytes=GIB)
    generator = torch.Generator().manual_seed(0)
    for name, tensor_shape in expected.items():
        writer.add(name, (0.02 * torch.randn(tensor_shape, generator=generator)).bfloat16())
    writer.finish()
    sizes = {name: 2 * torch.Size(s).numel() for name, s in expected.items()}
    layer = sum(v for k, v in sizes.items() if k.startswith("model.layers.0."))
    return {"params": shape.num_parameters, "model_bytes": sum(sizes.values()),
            "layer_bytes": layer, "embedding_bytes": sizes["model.embed_tokens.weight"]}


def measure(argv: list[str]) -> dict:
    """Run `python argv` in a child; wall time and peak RSS of its process tree."""
    start = time.perf_counter()
    child = subprocess.Popen([sys.executable, *argv], cwd=ROOT, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
    peak = [0]
    stop = threading.Event()

    def sample() -> None:
        proc = psutil.Process(child.pid)
        while not stop.is_set():
            try:
                rss = proc.memory_info().rss + sum(
                    c.memory_info().rss for c in proc.children(recursive=True))
            except psutil.Error:
                rss = 0
            peak[0] = max(peak[0], rss)
            time.sleep(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    _, err = child.communicate()
    stop.set()
    sampler.join()
    if child.returncode:
        raise RuntimeError(f"{' '.join(argv[:2])} failed:\n{err[-3000:]}")
    return {"seconds": time.perf_counter() - start, "peak_rss_bytes": peak[0]}


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=ONE_B["num_hidden_layers"],
                   help="decoder layers (16 for the 1B shape; fewer for a quick run)")
    p.add_argument("--workdir", type=Path, default=None, help="scratch space (default: a tmp dir)")
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="megarl-bench-convert-", dir=args.workdir))
    try:
        start = time.perf_counter()
        sizes = write_random_checkpoint(work / "hf", args.layers)
        print(f"wrote a random {sizes['params'] / 1e9:.2f}B-parameter checkpoint in "
              f"{time.perf_counter() - start:.0f}s")
        runs = {
            "baseline (imports only)": ["-c", BASELINE],
            "hf -> megatron": ["tools/convert_hf_to_megatron.py", "--hf-dir", str(work / "hf"),
                               "--output-dir", str(work / "mg"), "--progress", "off"],
            "megatron -> hf": ["tools/convert_megatron_to_hf.py", "--megatron-dir",
                               str(work / "mg"), "--output-dir", str(work / "back"),
                               "--hf-config-dir", str(work / "hf"), "--progress", "off"],
        }
        results = {name: measure(argv) for name, argv in runs.items()}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report(sizes, results)
    write_json(args.json, "bench_convert", {"sizes": sizes, "runs": results})


def report(sizes: dict, results: dict) -> None:
    base = results["baseline (imports only)"]["peak_rss_bytes"]
    unit = sizes["layer_bytes"] + sizes["embedding_bytes"]
    rows = []
    for name, r in results.items():
        extra = r["peak_rss_bytes"] - base
        r["peak_above_baseline_bytes"] = extra
        rows.append({
            "run": name, "seconds": r["seconds"], "peak RSS GiB": r["peak_rss_bytes"] / GIB,
            "above baseline GiB": extra / GIB,
            "/ (layer+embedding)": extra / unit if name != "baseline (imports only)" else None,
            "/ model": extra / sizes["model_bytes"] if name != "baseline (imports only)" else None,
        })
    print_table(rows, title=f"conversion of a {sizes['params'] / 1e9:.2f}B model "
                f"({sizes['model_bytes'] / GIB:.2f} GiB; largest layer "
                f"{sizes['layer_bytes'] / GIB:.3f} GiB + embedding "
                f"{sizes['embedding_bytes'] / GIB:.3f} GiB)")


if __name__ == "__main__":
    main()
