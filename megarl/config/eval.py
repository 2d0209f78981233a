"""`eval`: benchmark evaluation (avg@n, pass@k, maj@k), standalone or every N training steps."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from .errors import ConfigError, check_non_negative, check_positive, check_range

DEFAULT_PROMPT_TEMPLATE = (
    "{prompt}\nPlease reason step by step, and put your final answer within \\boxed{{}}."
)


@dataclass(kw_only=True)
class EvalConfig:
    benchmarks: list[str] = field(default_factory=list)
    """Benchmark files (.jsonl with a problem and an answer per line, see
    megarl/eval/BENCHMARKS.md), each named by its file stem or written `name=path`."""

    interval: int = 0
    """Evaluate every this many training steps; 0 only evaluates when asked (`megarl eval`)."""

    samples_per_problem: int = 4
    """Responses sampled per problem (the n of avg@n)."""

    k: list[int] = field(default_factory=lambda: [1])
    """The k values of pass@k and maj@k; each at most samples_per_problem (maj@k for k < n is
    the mean vote over all k-subsets of the n samples, see megarl/eval/estimators.py)."""

    max_problems: Optional[int] = None
    """Evaluate only the first this many problems of each benchmark (quick periodic checks);
    null for all."""

    prompt_template: str = DEFAULT_PROMPT_TEMPLATE
    """Format string turning a problem into the user message, with `{prompt}`; keep it the same
    as data.prompt_template when the model was trained with one."""

    system_prompt: Optional[str] = None
    """System message put before the problem when the chat template is applied."""

    apply_chat_template: bool = True
    """Render prompts with the tokenizer's chat template (plain text when false or absent)."""

    problems_per_request_batch: int = 64
    """Problems handed to the generator at once; progress advances per batch, and a smaller
    batch bounds the responses held in flight."""

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
        check_positive("eval", "max_problems", self.max_problems)
        check_positive("eval", "problems_per_request_batch", self.problems_per_request_batch)
        if "{prompt}" not in self.prompt_template:
            raise ConfigError("eval.prompt_template", "must contain the placeholder {prompt}")
        for i, spec in enumerate(self.benchmarks):
            path = spec.partition("=")[2] if "=" in spec else spec
            if not path.endswith(".jsonl"):
                raise ConfigError(f"eval.benchmarks[{i}]", f"{spec!r} is not a .jsonl file")
