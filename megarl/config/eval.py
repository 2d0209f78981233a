"""`eval`: benchmark evaluation (avg@n, pass@k, maj@k), standalone or every N training steps."""

from __future__ import annotations

from dataclasses import dataclass, field

from .errors import ConfigError, check_non_negative, check_positive, check_range


@dataclass(kw_only=True)
class EvalConfig:
    benchmarks: list[str] = field(default_factory=list)
    """Benchmark files (.jsonl with a problem and an answer per line)."""

    interval: int = 0
    """Evaluate every this many training steps; 0 only evaluates when asked (`megarl eval`)."""

    samples_per_problem: int = 4
    """Responses sampled per problem (the n of avg@n)."""

    k: list[int] = field(default_factory=lambda: [1])
    """The k values of pass@k and maj@k; each at most samples_per_problem."""

    problem_key: str = "problem"
    """Column holding the problem."""

    answer_key: str = "answer"
    """Column holding the reference answer."""

    temperature: float = 0.6
    """Sampling temperature of evaluation."""

    top_p: float = 0.95
    """Nucleus sampling threshold of evaluation."""

    max_new_tokens: int = 3072
    """Longest evaluation response."""

    def validate(self) -> None:
        check_non_negative("eval", "interval", self.interval)
        check_positive("eval", "samples_per_problem", self.samples_per_problem)
        for i, k in enumerate(self.k):
            if not 1 <= k <= self.samples_per_problem:
                raise ConfigError(f"eval.k[{i}]", f"{k} is out of range: must be in "
                                  f"[1, eval.samples_per_problem = {self.samples_per_problem}]")
        check_positive("eval", "temperature", self.temperature)
        check_range("eval", "top_p", self.top_p, low=0, high=1, low_open=True)
        check_positive("eval", "max_new_tokens", self.max_new_tokens)
