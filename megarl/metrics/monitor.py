"""Everything the trainer does with a step's metrics, in one call.

    monitor = TrainingMonitor(cfg.logging, cfg.trainer, start_step=step0, run_config=resolved)
    monitor.load_state_dict(ckpt["monitor"])          # when resuming
    for step in range(step0, cfg.trainer.num_steps + 1):
        ...
        monitor.step(step, metrics)                    # law fit, metrics.jsonl/TB/W&B, progress
        if evaluating:
            result = evaluate(client, tokenizer, cfg.eval.benchmarks, cfg.eval)
            monitor.log(step, flat_metrics(result))       # eval/<benchmark>/<figure>
    monitor.close()

The entropy-performance law is fitted online to (`entropy/mean`, `reward/mean`) of the training
batches once `trainer.entropy_law_min_steps` steps are in, and its `entropy_law/a`, `/b`,
`/ceiling` and `/r2` join the step's metrics. Cui et al. fit validation reward; the training
reward is what every step has, and the report refits on whatever the run logged.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

from megarl.config.logging import LoggingConfig
from megarl.config.trainer import TrainerConfig

from .entropy_law import ENTROPY_KEY, REWARD_KEY, EntropyLawFitter
from .logger import MetricsLogger, is_logging_rank, to_floats
from .progress import Progress, step_status


class TrainingMonitor:
    """Metrics logger, progress display and entropy-law fitter of a training run.

    Every rank may call it; only the logging rank (`enabled`, default global rank 0) writes
    and shows anything. The law fitter runs everywhere so its state is the same on all ranks.
    """

    def __init__(
        self, logging_cfg: LoggingConfig, trainer_cfg: TrainerConfig, *, start_step: int = 1,
        enabled: Optional[bool] = None, run_config: Optional[Mapping[str, Any]] = None,
    ) -> None:
        enabled = is_logging_rank() if enabled is None else enabled
        self.logger = MetricsLogger(logging_cfg, start_step=start_step, enabled=enabled,
                                    run_config=run_config)
        self.progress = Progress.from_config(logging_cfg, trainer_cfg.num_steps, desc="train",
                                             initial=start_step - 1, enabled=enabled)
        self.law = EntropyLawFitter(min_points=trainer_cfg.entropy_law_min_steps)

    def step(self, step: int, metrics: Mapping[str, Any]) -> dict[str, float]:
        """Log one training step; returns the metrics as logged (with the law's figures)."""
        logged = to_floats(metrics)
        if ENTROPY_KEY in logged and REWARD_KEY in logged:
            logged |= self.law.update(logged[ENTROPY_KEY], logged[REWARD_KEY])
        self.logger.log(step, logged)
        self.progress.advance(1, step_status(logged))
        return logged

    def log(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Log more metrics of `step` outside the step's own record (e.g. evaluation)."""
        self.logger.log(step, metrics)

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps so a resumed run fits the law on the same points."""
        return {"entropy_law": self.law.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.law.load_state_dict(state["entropy_law"])

    def close(self) -> None:
        self.progress.close()
        self.logger.close()

    def __enter__(self) -> "TrainingMonitor":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
