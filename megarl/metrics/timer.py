"""Wall time of the phases of a training step, as `time/<phase>` metrics.

    timer = PhaseTimer()
    with timer.phase("rollout"):
        batch = rollout(...)
    with timer.phase("train"):
        ...
    metrics |= timer.metrics()       # {"time/rollout": 12.3, "time/train": 20.1, "time/step": 32.4}
    timer.reset()
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Iterator


def _synchronize() -> None:
    # Kernels run asynchronously: without a sync a GPU phase would be charged to the next one.
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


class PhaseTimer:
    """Sums the wall time of named phases since the last `reset`."""

    def __init__(self, *, synchronize: bool = True) -> None:
        self.synchronize = synchronize
        self._seconds: dict[str, float] = {}
        self._start = time.perf_counter()

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        if self.synchronize:
            _synchronize()
        start = time.perf_counter()
        try:
            yield
        finally:
            if self.synchronize:
                _synchronize()
            self._seconds[name] = self._seconds.get(name, 0.0) + time.perf_counter() - start

    def metrics(self) -> dict[str, float]:
        """`time/<phase>` per phase, plus `time/step`: all the time since the last reset."""
        out = {f"time/{name}": seconds for name, seconds in self._seconds.items()}
        out["time/step"] = time.perf_counter() - self._start
        return out

    def reset(self) -> None:
        self._seconds.clear()
        self._start = time.perf_counter()
