"""`trainer`: the length of the run, its seed, and how it reacts to bad steps."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from .errors import check_non_negative, check_positive, check_range


@dataclass(kw_only=True)
class TrainerConfig:
    num_steps: int = 100
    """Training steps (rollout + update) to run."""

    seed: int = 42
    """Seed of data shuffling, sampling and every random choice of the losses."""

    max_nonfinite_steps: int = 3
    """A step whose loss or gradient is NaN/inf is skipped; this many in a row stop the run."""

    record_rollouts: bool = False
    """Save each step's rollout batch under <output_dir>/rollouts for replay."""

    replay_dir: Optional[str] = None
    """Train from rollout batches saved by `record_rollouts` instead of generating (no servers)."""

    entropy_law_min_steps: int = 5
    """Steps of (entropy/mean, reward/mean) pairs before the entropy-performance law
    R = -a exp(H) + b is fitted and entropy_law/a, /b, /ceiling (= b - a) and /r2 are logged
    (at least 2: a line needs two points)."""

    def validate(self) -> None:
        check_positive("trainer", "num_steps", self.num_steps)
        check_non_negative("trainer", "seed", self.seed)
        check_positive("trainer", "max_nonfinite_steps", self.max_nonfinite_steps)
        check_range("trainer", "entropy_law_min_steps", self.entropy_law_min_steps, low=2)
