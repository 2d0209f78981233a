"""`checkpoint`: when resumable checkpoints are written and where a run resumes from."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from .errors import check_non_negative, check_positive


@dataclass(kw_only=True)
class CheckpointConfig:
    dir: Optional[str] = None
    """Where checkpoints go; null means <logging.output_dir>/checkpoints."""

    save_interval: int = 50
    """Steps between checkpoints; 0 saves only at the end and on a clean stop."""

    keep_last: int = 3
    """Complete checkpoints kept; older ones are deleted once a newer one is complete."""

    resume: str = "auto"
    """auto (the latest complete checkpoint in `dir`, or a fresh start if there is none), never,
    or the path of one checkpoint."""

    save_optimizer: bool = True
    """Save optimizer state (needed for exact resume)."""

    def validate(self) -> None:
        check_non_negative("checkpoint", "save_interval", self.save_interval)
        check_positive("checkpoint", "keep_last", self.keep_last)
