"""Observability shared by training, conversion tools and evaluation: the metrics logger
(metrics.jsonl, TensorBoard, W&B), the progress display, phase timers and the
entropy-performance law fit."""

from .entropy_law import EntropyLawFit, EntropyLawFitter, fit_entropy_law
from .jsonl import METRICS_FILE, read_metrics
from .logger import MetricsLogger, is_logging_rank
from .monitor import TrainingMonitor
from .progress import Progress, step_status
from .timer import PhaseTimer

__all__ = [
    "EntropyLawFit", "EntropyLawFitter", "METRICS_FILE", "MetricsLogger", "PhaseTimer",
    "Progress", "TrainingMonitor", "fit_entropy_law", "is_logging_rank", "read_metrics",
    "step_status",
]
