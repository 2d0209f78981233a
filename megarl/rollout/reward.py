"""Scoring responses: math answers checked with math-verify, or a user function by dotted path.

Every call runs in a pool of worker processes with a time limit (`reward.timeout_s`): a call
past its limit has its worker killed and replaced, and scores 0; a call that raises, returns a
non-number or kills its worker scores 0 too. Both are counted (`RewardResult.num_timeouts`,
`num_errors`), the first few reported, and the run goes on.

`reward.function`:
* `math`: the last \\boxed{...} of the response, compared with the reference answer by
  math-verify (1.0 if equivalent, else 0.0; no \\boxed{} scores 0).
* `package.module:function`: called as `function(response, answer, **reward.options)` and
  returning a real number.

Workers start from a fork server that has math-verify imported already, so replacing a killed
worker is cheap. As with every multiprocessing start method but fork, a script that scores
rewards needs an `if __name__ == "__main__":` guard (workers import the main module).
"""

from __future__ import annotations

import logging
import math
import multiprocessing as mp
import numbers
import time
import traceback
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from typing import Any, Callable, Optional, Sequence

logger = logging.getLogger(__name__)

_MAX_REPORTED = 5


def last_boxed(text: str) -> Optional[str]:
    """The content of the last \\boxed{...} (or \\fbox{...}) in `text`, braces balanced."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    i = start + (6 if text.startswith("\\boxed", start) else 5)
    if i < len(text) and text[i] == " ":  # "\boxed 5": the next token is the answer
        rest = text[i + 1:].split("$")[0].strip()
        return rest.split()[0] if rest else None
    if i >= len(text) or text[i] != "{":
        return None
    depth = 0
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1:j]
    return None


def math_reward(response: str, answer: Any) -> float:
    """1.0 when the last \\boxed{} of `response` is equivalent to `answer` (math-verify)."""
    from math_verify import parse, verify

    predicted = last_boxed(response)
    if predicted is None:
        return 0.0
    gold_text = str(answer).strip()
    boxed_gold = last_boxed(gold_text)
    gold_text = boxed_gold if boxed_gold is not None else gold_text
    gold = parse("\\boxed{" + gold_text + "}")
    pred = parse("\\boxed{" + predicted + "}")
    if not gold:  # math-verify cannot read the reference: fall back to exact text
        return float(predicted.strip() == gold_text)
    return float(verify(gold, pred))


def load_reward_function(spec: str) -> Callable[..., Any]:
    """`math` or a dotted path `package.module:function`."""
    if spec == "math":
        return math_reward
    from megarl.config import load_dotted

    fn = load_dotted(spec, "reward.function")
    if not callable(fn):
        raise TypeError(f"reward.function {spec!r} is not callable")
    return fn


def _check_value(value: Any) -> float:
    if isinstance(value, numbers.Real) and math.isfinite(float(value)):
        return float(value)
    raise TypeError(f"reward function returned {value!r:.80}, not a finite real number")


def _worker_main(conn: Connection, spec: str, options: dict) -> None:
    """A worker: load the function once, then answer (index, response, answer) tasks."""
    fn = load_reward_function(spec)
    while True:
        try:
            task = conn.recv()
        except EOFError:
            return
        if task is None:
            return
        index, response, answer = task
        try:
            conn.send((index, True, _check_value(fn(response, answer, **options))))
        except Exception as exc:  # noqa: BLE001 - every failure is a scored 0, reported upstream
            trace = traceback.format_exc(limit=3)
            conn.send((index, False, f"{type(exc).__name__}: {exc}\n{trace}"))


def _receive(conn: Connection) -> Optional[tuple]:
    """A worker's reply, or None when its end of the pipe closed (the worker died)."""
    try:
        return conn.recv() if conn.poll() else None
    except (EOFError, OSError):
        return None


@dataclass
class RewardResult:
    rewards: list[float]
    num_timeouts: int = 0
    num_errors: int = 0
    messages: list[str] = field(default_factory=list)
    """The first few failures, with the response index."""


@dataclass(eq=False)
class _Worker:
    process: Any
    conn: Connection
    task: Optional[int] = None
    deadline: float = 0.0


class RewardComputer:
    """Scores (response, answer) pairs in worker processes, each call under a time limit."""

    def __init__(self, function: str = "math", *, options: Optional[dict] = None,
                 timeout_s: float = 10.0, num_workers: int = 4) -> None:
        self.spec = function
        self.options = dict(options or {})
        self.timeout_s = timeout_s
        self.num_workers = num_workers
        self.total_timeouts = 0
        self.total_errors = 0
        self._ctx = mp.get_context("forkserver")
        self._ctx.set_forkserver_preload(["math_verify", "megarl.rollout.reward"])
        self._workers: list[_Worker] = []

    @classmethod
    def from_config(cls, reward: Any) -> "RewardComputer":
        return cls(reward.function, options=reward.options, timeout_s=reward.timeout_s,
                   num_workers=reward.num_workers)

    def _spawn(self) -> _Worker:
        parent, child = self._ctx.Pipe()
        process = self._ctx.Process(target=_worker_main, args=(child, self.spec, self.options),
                                    daemon=True, name="megarl-reward")
        process.start()
        child.close()
        return _Worker(process, parent)

    def score(self, responses: Sequence[str], answers: Sequence[Any]) -> RewardResult:
        """One reward per response, in order (see the module docstring for failures)."""
        if len(responses) != len(answers):
            raise ValueError(f"{len(responses)} responses but {len(answers)} answers")
        while len(self._workers) < self.num_workers:
            self._workers.append(self._spawn())
        result = RewardResult(rewards=[0.0] * len(responses))
        pending = list(range(len(responses)))[::-1]
        remaining = len(responses)
        while remaining:
            for worker in self._workers:
                if worker.task is None and pending:
                    worker.task = pending.pop()
                    worker.deadline = time.monotonic() + self.timeout_s
                    worker.conn.send((worker.task, responses[worker.task], answers[worker.task]))
            remaining -= self._collect(result)
        self.total_timeouts += result.num_timeouts
        self.total_errors += result.num_errors
        if result.num_timeouts or result.num_errors:
            logger.warning("rewards: %d timed out, %d failed (scored 0): %s", result.num_timeouts,
                           result.num_errors, "; ".join(m.splitlines()[0] for m in result.messages))
        return result

    def _collect(self, result: RewardResult) -> int:
        """Wait for the next replies, deaths or deadlines; returns how many calls ended."""
        busy = [w for w in self._workers if w.task is not None]
        timeout = max(0.0, min(w.deadline for w in busy) - time.monotonic())
        ready = set(wait([w.conn for w in busy] + [w.process.sentinel for w in busy], timeout))
        ended = 0
        for i, worker in enumerate(self._workers):
            if worker.task is None:
                continue
            reply = _receive(worker.conn) if worker.conn in ready else None
            if reply is not None:
                index, ok, value = reply
                if ok:
                    result.rewards[index] = value
                else:
                    self._failed(result, index, value, timeout=False)
                worker.task = None
                ended += 1
            elif (worker.process.sentinel in ready or worker.conn in ready
                  or time.monotonic() >= worker.deadline):
                # a closed pipe or an ended process is a death, whatever the clock says
                died = worker.process.sentinel in ready or worker.conn in ready
                if died:
                    worker.process.join(1.0)
                why = (f"worker died with exit code {worker.process.exitcode}" if died
                       else f"no result within reward.timeout_s={self.timeout_s:g} s")
                self._failed(result, worker.task, why, timeout=not died)
                self._stop(worker)
                self._workers[i] = self._spawn()
                ended += 1
        return ended

    def _failed(self, result: RewardResult, index: int, message: str, *, timeout: bool) -> None:
        result.rewards[index] = 0.0
        if timeout:
            result.num_timeouts += 1
        else:
            result.num_errors += 1
        if len(result.messages) < _MAX_REPORTED:
            result.messages.append(f"response {index}: {message}")

    @staticmethod
    def _stop(worker: _Worker) -> None:
        worker.process.kill()
        worker.process.join(5)
        worker.conn.close()

    def close(self) -> None:
        for worker in self._workers:
            try:
                worker.conn.send(None)
            except OSError:
                pass
        for worker in self._workers:
            worker.process.join(2)
            if worker.process.is_alive():
                self._stop(worker)
        self._workers = []

    def __enter__(self) -> "RewardComputer":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
