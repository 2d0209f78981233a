"""Optional metric destinations beside metrics.jsonl: TensorBoard and Weights & Biases.

Both are imported only when enabled: TensorBoard's writer pulls in the tensorboard package,
and wandb is an optional dependency (`pip install megarl[wandb]`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Optional

WANDB_ID_FILE = "wandb_run_id"


class TensorBoardBackend:
    """Scalars under `<output_dir>/tensorboard`, one tag per metric name."""

    def __init__(self, log_dir: str | Path, *, start_step: Optional[int] = None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        # purge_step makes TensorBoard hide events of steps >= start_step left by the run
        # before the resume, the same rule metrics.jsonl follows.
        self._writer = SummaryWriter(log_dir=str(log_dir), purge_step=start_step, flush_secs=30)

    def write(self, step: int, wall_time: float, metrics: Mapping[str, float]) -> None:
        for key, value in metrics.items():
            self._writer.add_scalar(key, value, global_step=step, walltime=wall_time)

    def flush(self) -> None:
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


class WandbBackend:
    """A Weights & Biases run. Its id is kept in `<output_dir>/wandb_run_id` so that a resumed
    run continues the same W&B run instead of starting a new one."""

    def __init__(self, output_dir: str | Path, *, project: str, run_name: Optional[str],
                 run_config: Optional[Mapping[str, Any]] = None) -> None:
        try:
            import wandb
        except ImportError:
            raise ImportError(
                "logging.wandb is true but the wandb package is not installed: "
                "`pip install wandb` (or megarl[wandb]), or set logging.wandb=false"
            ) from None
        output_dir = Path(output_dir)
        id_file = output_dir / WANDB_ID_FILE
        run_id = id_file.read_text().strip() if id_file.exists() else wandb.util.generate_id()
        self._run = wandb.init(
            project=project, name=run_name or output_dir.resolve().name, id=run_id,
            resume="allow", dir=str(output_dir), config=dict(run_config or {}),
        )
        id_file.write_text(run_id + "\n")

    def write(self, step: int, wall_time: float, metrics: Mapping[str, float]) -> None:
        self._run.log(dict(metrics), step=step)

    def flush(self) -> None:
        """W&B streams in the background; nothing to do."""

    def close(self) -> None:
        self._run.finish()
