"""`reward`: how a response is scored."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigError, check_positive


@dataclass(kw_only=True)
class RewardConfig:
    function: str = "math"
    """math: the final answer (last \\boxed{...}) checked against the reference with math-verify,
    1 if equal and 0 if not; or a dotted path `package.module:function` taking
    (response: str, answer: str, **options) and returning a float."""

    options: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments passed to a user reward function."""

    timeout_s: float = 10.0
    """Time limit of one reward call; a call past it scores 0 and is counted."""

    num_workers: int = 4
    """Worker processes that compute rewards, so a pathological answer cannot hang the run."""

    def validate(self) -> None:
        if self.function != "math" and ":" not in self.function:
            raise ConfigError(
                "reward.function",
                f"{self.function!r} is neither 'math' nor a dotted path 'package.module:function'",
            )
        check_positive("reward", "timeout_s", self.timeout_s)
        check_positive("reward", "num_workers", self.num_workers)
