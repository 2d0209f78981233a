"""Evaluate a model on benchmarks: sample n responses per problem, verify them with
math-verify, and report avg@n, pass@k and maj@k per benchmark and on average.

    result = evaluate(client, tokenizer, cfg.eval.benchmarks, cfg.eval)
    logger.log(step, flat_metrics(result))     # eval/aime24/avg@4, ..., eval/average/maj@4
    print(format_table(result))

The average over benchmarks is the unweighted mean of the per-benchmark figures (the
convention of the papers' tables), not a mean over all problems.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from megarl.config.eval import EvalConfig

from .answers import ScoredSample, score_samples
from .benchmarks import Benchmark, BenchmarkSpec, Problem, load_benchmarks
from .estimators import avg_at_n, maj_at_k, majority_label, pass_at_k
from .generation import (
    Generator, SamplingParams, as_generator, check_responses, count_tokens, render_prompt,
)
from .table import text_table

SampleSink = Callable[[dict[str, Any]], None]
"""Receives one record per problem: its responses, extracted answers and verdicts."""

TOKENS_KEY = "response_tokens/mean"


def evaluate(
    generator: Any, tokenizer: Optional[Any], benchmarks: Sequence[BenchmarkSpec],
    eval_cfg: EvalConfig, *, progress: Optional[Any] = None,
    sample_sink: Optional[SampleSink] = None, reward: Optional[Any] = None,
) -> dict[str, Any]:
    """Run every benchmark and return {"n", "k", "sampling", "benchmarks": {name: figures},
    "average": figures}; figures are fractions in [0, 1].

    `generator`: an eval `Generator`, or the trainer's running rollout client (anything with
    `generate_batch`, e.g. `megarl.rollout.RolloutClient`). `tokenizer` renders chat prompts,
    encodes them for a client and counts response tokens (None: plain prompts, no counts).
    `progress` (a `megarl.metrics.Progress`, optional) advances by problems.
    `reward`: a math `megarl.rollout.reward.RewardComputer` to take the verdicts from (worker
    processes with hard time limits, usable from any thread); without one they are computed
    here, which math-verify's SIGALRM time limits confine to the main thread.
    """
    if reward is not None and getattr(reward, "spec", "math") != "math":
        # A user reward function (graded, format terms...) is not a correctness verdict.
        reward = None
    generator = as_generator(generator, tokenizer, eval_cfg)
    loaded = load_benchmarks(benchmarks, eval_cfg)
    params = SamplingParams.from_config(eval_cfg)
    hooks = _Hooks(progress, sample_sink, reward)
    per_benchmark: dict[str, dict[str, float]] = {}
    for bench in loaded:
        rows = _run_benchmark(generator, tokenizer, bench, eval_cfg, params, hooks)
        per_benchmark[bench.name] = _mean_rows(rows) | {"num_problems": len(rows)}
    return {
        "n": params.num_samples,
        "k": list(eval_cfg.k),
        "sampling": asdict(params),
        "benchmarks": per_benchmark,
        "average": _average(per_benchmark),
    }


def problem_figures(scored: Sequence[ScoredSample], ks: Sequence[int]) -> dict[str, float]:
    """avg@n, pass@k and maj@k of one problem from its scored samples."""
    n = len(scored)
    num_correct = sum(s.correct for s in scored)
    labels = [s.cluster for s in scored]
    correct_labels = {s.cluster for s in scored if s.correct}
    figures = {f"avg@{n}": avg_at_n(n, num_correct)}
    figures |= {f"pass@{k}": pass_at_k(n, num_correct, k) for k in ks}
    figures |= {f"maj@{k}": maj_at_k(labels, correct_labels, k) for k in ks}
    return figures


@dataclass(frozen=True)
class _Hooks:
    """The optional helpers of one evaluation."""

    progress: Optional[Any]
    sample_sink: Optional[SampleSink]
    reward: Optional[Any]

    def verdicts(self, problems: Sequence[Problem],
                 responses: Sequence[Sequence[str]]) -> list[Optional[list[bool]]]:
        """Per problem, the reward pool's verdicts (None: score in this process)."""
        if self.reward is None:
            return [None] * len(problems)
        flat = [text for texts in responses for text in texts]
        answers = [p.answer for p, texts in zip(problems, responses) for _ in texts]
        rewards = iter(self.reward.score(flat, answers).rewards)
        return [[next(rewards) == 1.0 for _ in texts] for texts in responses]


def _run_benchmark(
    generator: Generator, tokenizer: Optional[Any], bench: Benchmark, cfg: EvalConfig,
    params: SamplingParams, hooks: _Hooks,
) -> list[dict[str, float]]:
    rows = []
    progress, sample_sink = hooks.progress, hooks.sample_sink
    size = cfg.problems_per_request_batch
    for start in range(0, len(bench.problems), size):
        chunk = bench.problems[start:start + size]
        prompts = [render_prompt(p.problem, tokenizer, cfg) for p in chunk]
        responses = check_responses(prompts, generator.sample(prompts, params),
                                    params.num_samples)
        for problem, texts, correct in zip(chunk, responses, hooks.verdicts(chunk, responses)):
            scored = score_samples(texts, problem.answer, correct)
            row = problem_figures(scored, cfg.k)
            tokens = count_tokens(texts, tokenizer)
            if tokens is not None:
                row[TOKENS_KEY] = sum(tokens) / len(tokens)
            rows.append(row)
            if sample_sink is not None:
                sample_sink(_sample_record(bench.name, problem, texts, scored, row))
        if progress is not None:
            progress.advance(len(chunk), {"benchmark": bench.name})
    return rows


def _sample_record(name: str, problem: Problem, texts: Sequence[str],
                   scored: Sequence[ScoredSample], row: dict[str, float]) -> dict[str, Any]:
    winner = majority_label([s.cluster for s in scored])
    majority = next((s.answer for s in scored if winner is not None and s.cluster == winner),
                    None)
    return {
        "benchmark": name, "line": problem.line, "problem": problem.problem,
        "reference": problem.answer, "responses": list(texts),
        "answers": [s.answer for s in scored], "correct": [s.correct for s in scored],
        "clusters": [s.cluster for s in scored], "majority_answer": majority, "figures": row,
    }


def _mean_rows(rows: Sequence[dict[str, float]]) -> dict[str, float]:
    keys = list(rows[0])
    return {key: sum(row[key] for row in rows) / len(rows) for key in keys}


def _average(per_benchmark: dict[str, dict[str, float]]) -> dict[str, float]:
    figures = list(per_benchmark.values())
    keys = [k for k in figures[0] if k != "num_problems" and all(k in f for f in figures)]
    average = {key: sum(f[key] for f in figures) / len(figures) for key in keys}
    average["num_problems"] = sum(f["num_problems"] for f in figures)
    return average


def flat_metrics(result: dict[str, Any], prefix: str = "eval") -> dict[str, float]:
    """The figures as one flat dict for the metrics logger, e.g. `eval/aime24/pass@8`."""
    flat = {}
    sections = dict(result["benchmarks"]) | {"average": result["average"]}
    for name, figures in sections.items():
        for key, value in figures.items():
            if key != "num_problems":
                flat[f"{prefix}/{name}/{key}"] = float(value)
    return flat


def metric_columns(result: dict[str, Any]) -> list[str]:
    """Table columns in reading order: avg@n, pass@k..., maj@k..., response tokens."""
    n, ks = result["n"], result["k"]
    columns = [f"avg@{n}"] + [f"pass@{k}" for k in ks] + [f"maj@{k}" for k in ks]
    if TOKENS_KEY in result["average"]:
        columns.append(TOKENS_KEY)
    return columns


def format_table(result: dict[str, Any]) -> str:
    """A plain-text table, one row per benchmark and one for the average; rates in percent."""
    columns = metric_columns(result)
    header = ["benchmark", "problems"] + [c.replace(TOKENS_KEY, "tokens") for c in columns]
    sections = dict(result["benchmarks"]) | {"average": result["average"]}
    body = []
    for name, figures in sections.items():
        cells = [name, str(figures["num_problems"])]
        for column in columns:
            value = figures.get(column, math.nan)
            cells.append(f"{value:.0f}" if column == TOKENS_KEY else f"{100 * value:.1f}")
        body.append(cells)
    return text_table(header, body)


def write_result(result: dict[str, Any], path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
