"""Benchmark files: one JSON object per line with a problem and its reference answer.

The expected format, and how to produce it for AIME24, AIME25, AMC23, MATH500, Minerva and
OlympiadBench, is described in `megarl/eval/BENCHMARKS.md`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

from megarl.config.eval import EvalConfig


@dataclass(frozen=True)
class Problem:
    """One benchmark problem."""

    problem: str
    """The question as given to the model (before the prompt template)."""

    answer: str
    """The reference final answer."""

    line: int
    """1-based line of the file it came from (for error messages and sample dumps)."""


@dataclass(frozen=True)
class Benchmark:
    """A named list of problems."""

    name: str
    path: str
    problems: tuple[Problem, ...]


BenchmarkSpec = Union[str, Path, Benchmark]


def split_spec(spec: str | Path) -> tuple[str, Path]:
    """`name=path` or a bare path (named by its file stem) -> (name, path)."""
    text = str(spec)
    name, sep, path = text.partition("=")
    if sep and name and "/" not in name:
        return name, Path(path)
    return Path(text).stem, Path(text)


def load_benchmark(
    spec: str | Path, *, problem_key: str = "problem", answer_key: str = "answer",
    max_problems: Optional[int] = None,
) -> Benchmark:
    """Read a .jsonl benchmark; ValueError with file and line for a malformed row."""
    name, path = split_spec(spec)
    if not path.is_file():
        raise FileNotFoundError(f"benchmark {name!r}: {path} does not exist")
    problems: list[Problem] = []
    with path.open(encoding="utf-8") as f:
        for number, text in enumerate(f, start=1):
            if not text.strip():
                continue
            problems.append(_parse_row(text, path, number, problem_key, answer_key))
            if max_problems is not None and len(problems) >= max_problems:
                break
    if not problems:
        raise ValueError(f"benchmark {name!r}: {path} has no problems")
    return Benchmark(name=name, path=str(path), problems=tuple(problems))


def load_benchmarks(specs: Sequence[BenchmarkSpec], eval_cfg: EvalConfig) -> list[Benchmark]:
    """Load every benchmark named in `specs` (already loaded ones pass through); names must be
    unique because they key the results."""
    benchmarks = [
        spec if isinstance(spec, Benchmark) else load_benchmark(
            spec, problem_key=eval_cfg.problem_key, answer_key=eval_cfg.answer_key,
            max_problems=eval_cfg.max_problems)
        for spec in specs
    ]
    names = [b.name for b in benchmarks]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"benchmark names must be unique, {repeated} repeat: name the files "
                         "apart or write them as name=path")
    return benchmarks


def _parse_row(text: str, path: Path, number: int, problem_key: str, answer_key: str) -> Problem:
    where = f"{path}:{number}"
    try:
        row = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{where}: not valid JSON ({exc.msg})") from None
    if not isinstance(row, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}")
    for key in (problem_key, answer_key):
        if key not in row or row[key] is None:
            raise ValueError(f"{where}: no {key!r} field (it has: {', '.join(sorted(row))}); "
                             "set eval.problem_key / eval.answer_key to the file's columns")
    # Answers are often numbers in the source files; math-verify reads text.
    return Problem(problem=str(row[problem_key]), answer=str(row[answer_key]), line=number)
