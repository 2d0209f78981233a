"""Benchmark evaluation: avg@n, pass@k and maj@k of sampled, math-verified answers (`megarl
eval`), and the plots of training runs (`megarl report`)."""

from .benchmarks import Benchmark, Problem, load_benchmark, load_benchmarks
from .estimators import avg_at_n, maj_at_k, pass_at_k
from .evaluate import evaluate, flat_metrics, format_table, write_result
from .generation import Generator, SamplingParams

__all__ = [
    "Benchmark", "Generator", "Problem", "SamplingParams", "avg_at_n", "evaluate",
    "flat_metrics", "format_table", "load_benchmark", "load_benchmarks", "maj_at_k",
    "pass_at_k", "write_result",
]
