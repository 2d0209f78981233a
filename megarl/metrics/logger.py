"""The metrics logger: one call per training step with a flat dict of floats.

    logger = MetricsLogger(cfg.logging, start_step=first_step, run_config=resolved_config)
    logger.log(step, {"reward/mean": 0.41, "entropy/mean": 0.83, "time/rollout": 12.3})
    logger.close()

Names are `group/name` (`reward/mean`, `entropy/nucleus_mean`, `cov/mean`,
`ppo/clip_frac_high`, `aer/alpha`, `siren/anchor`, `response_length/mean`, `time/rollout`,
`throughput/tokens_per_s`, `eval/aime24/maj@8`, ...); TensorBoard groups panels by the prefix.
Every record goes to `<output_dir>/metrics.jsonl`, and to TensorBoard and W&B when enabled.
Only the logging rank writes: the caller reduces metrics first, every other rank's logger is a
no-op, so the trainer can call `log` on all ranks without a branch.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Mapping, Optional

from megarl.config.logging import LoggingConfig

from .backends import TensorBoardBackend, WandbBackend
from .jsonl import METRICS_FILE, RESERVED_KEYS, JsonlMetricsFile


def is_logging_rank() -> bool:
    """Global rank 0 writes logs (True outside a process group)."""
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


class MetricsLogger:
    """Writes step metrics to metrics.jsonl, TensorBoard and W&B (see the module docstring).

    `start_step`: the first step this process will log; when resuming, records of this step and
    later that an interrupted run left behind are dropped. `enabled`: whether this process
    writes; default `is_logging_rank()`. `run_config`: the resolved config, given to W&B.
    """

    def __init__(
        self, cfg: LoggingConfig, *, start_step: Optional[int] = None,
        enabled: Optional[bool] = None, run_config: Optional[Mapping[str, Any]] = None,
    ) -> None:
        self.enabled = is_logging_rank() if enabled is None else enabled
        self.output_dir = Path(cfg.output_dir)
        self._jsonl: Optional[JsonlMetricsFile] = None
        self._backends: list[Any] = []
        if not self.enabled:
            return
        self._jsonl = JsonlMetricsFile(self.output_dir / METRICS_FILE, start_step=start_step)
        if cfg.tensorboard:
            self._backends.append(
                TensorBoardBackend(self.output_dir / "tensorboard", start_step=start_step))
        if cfg.wandb:
            self._backends.append(WandbBackend(
                self.output_dir, project=cfg.wandb_project, run_name=cfg.wandb_run_name,
                run_config=run_config))

    @property
    def path(self) -> Path:
        return self.output_dir / METRICS_FILE

    def log(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Record one step's metrics (numbers, 0-d tensors or numpy scalars)."""
        if not self.enabled or self._jsonl is None:
            return
        values = to_floats(metrics)
        now = time.time()
        self._jsonl.write(int(step), now, values)
        finite = {key: value for key, value in values.items() if math.isfinite(value)}
        for backend in self._backends:
            backend.write(int(step), now, finite)

    def flush(self) -> None:
        for backend in self._backends:
            backend.flush()

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        for backend in self._backends:
            backend.close()
        self._backends = []

    def __enter__(self) -> "MetricsLogger":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def to_floats(metrics: Mapping[str, Any]) -> dict[str, float]:
    """Metric values as floats; TypeError naming a value that is not a number."""
    values = {}
    for key, value in metrics.items():
        if key in RESERVED_KEYS:
            raise ValueError(f"metric name {key!r} is reserved for the record itself")
        if isinstance(value, str):
            raise TypeError(f"metric {key!r} is a string ({value!r}); log numbers only")
        try:
            values[key] = float(value)
        except (TypeError, ValueError, RuntimeError):
            raise TypeError(f"metric {key!r} = {value!r} is not a number") from None
    return values
