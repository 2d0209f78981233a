"""`logging`: where a run's outputs go and how progress and metrics are shown."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from .errors import check_choice, check_positive


@dataclass(kw_only=True)
class LoggingConfig:
    output_dir: str = "runs/megarl"
    """Run directory: resolved config, metrics.jsonl, TensorBoard events, plots, checkpoints."""

    tensorboard: bool = True
    """Write TensorBoard event files under <output_dir>/tensorboard."""

    wandb: bool = False
    """Log to Weights & Biases (needs `pip install wandb` and a login)."""

    wandb_project: str = "megarl"
    """Weights & Biases project."""

    wandb_run_name: Optional[str] = None
    """Weights & Biases run name; null uses the output directory's name."""

    progress: str = "auto"
    """Live progress display: auto (only when the console is a terminal), on, or off (plain
    progress lines every log_interval steps instead of a live bar)."""

    log_interval: int = 1
    """Steps between metric lines printed to the console."""

    def __post_init__(self) -> None:
        # YAML (and so omegaconf's command line) reads a bare on/off as a boolean, which lands
        # here as "True"/"False"; take it as the user meant it.
        self.progress = {"True": "on", "False": "off"}.get(str(self.progress), self.progress)

    def validate(self) -> None:
        check_choice("logging", "progress", self.progress, ("auto", "on", "off"))
        check_positive("logging", "log_interval", self.log_interval)
