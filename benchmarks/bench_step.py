"""Where a training step's time goes on CPU: rollout, log-probs, train, sync; tokens per second.

Runs the real `megarl train` (torchrun, TP=2 by default) on the demo's task with the CPU dev
server behind sglang-router, then reads the per-step phase timings from metrics.jsonl. The
first step (start-up effects) is left out of the averages.

    python benchmarks/bench_step.py --steps 8 --json step.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import parser, print_table, write_json  # noqa: E402

PHASES = ("rollout", "log_probs", "train", "sync")


def main() -> int:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--tp", type=int, default=2)
    p.add_argument("--intervention", default="siren")
    p.add_argument("--work-dir", type=Path, default=None,
                   help="keep the run here (default: a temporary directory)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = (args.work_dir or Path(tmp)).resolve()
        records = run(work, args)
    results = summarise(records, args)
    rows = [{"phase": phase, "seconds": results[f"{phase}_s"],
             "share": results[f"{phase}_s"] / results["step_s"]} for phase in PHASES]
    rows.append({"phase": "step", "seconds": results["step_s"], "share": 1.0})
    print_table(rows, title=f"one training step, mean of steps 2..{args.steps} "
                            f"(TP={args.tp}, {args.intervention})")
    print(f"tokens per second (prompt + response, whole step): {results['tokens_per_s']:.1f}")
    write_json(args.json, "step", results)
    return 0


def run(work: Path, args: argparse.Namespace) -> list[dict]:
    from megarl.metrics import read_metrics
    from megarl.trainer import demo

    hf_dir = demo.build_model(work / "hf", seed=1, warm_start_steps=50)
    megatron_dir = demo.convert(hf_dir, work / "megatron")
    data = demo.write_dataset(work / "data" / "train.jsonl")
    options = argparse.Namespace(intervention=args.intervention, tp=args.tp, seed=1,
                                 steps=args.steps, quick=False)
    config = demo.write_config(work, hf_dir, megatron_dir, data, options)
    code = demo.launch(config, args.tp)
    if code != 0:
        raise SystemExit(f"training failed with exit code {code}; logs in {work / 'run'}")
    return [r for r in read_metrics(work / "run") if "time/step" in r]


def summarise(records: list[dict], args: argparse.Namespace) -> dict:
    if len(records) < 2:
        raise SystemExit("need at least 2 steps")
    steady = records[1:]

    def mean(key: str) -> float:
        return statistics.fmean(r.get(key, 0.0) for r in steady)

    results = {f"{phase}_s": mean(f"time/{phase}") for phase in PHASES}
    results.update(step_s=mean("time/step"), tokens_per_s=mean("throughput/tokens_per_s"),
                   steps=len(records), tp=args.tp, intervention=args.intervention,
                   responses_per_step=mean("rollout/num_responses"))
    return results


if __name__ == "__main__":
    sys.exit(main())
