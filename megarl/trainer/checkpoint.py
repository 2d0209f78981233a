"""Resumable checkpoints of a training run: written whole or not at all.

Layout of `<checkpoint.dir>/step_000050/`:
  dist/          model and optimizer state, a Megatron distributed checkpoint (torch_dist) in
                 model space, so it loads at any TP/PP/DP
  trainer.pt     step, LR schedule, intervention state (SIREN anchor, AER alpha...), data
                 cursor, monitor state (entropy-law points), skipped-step counters
  metrics.jsonl  the metrics history up to this step
  rng/rank_N.pt  each rank's random generators (restored when the world size is unchanged)
  COMPLETE       written last; a directory without it is not a checkpoint
and `<checkpoint.dir>/latest`, a one-line pointer replaced atomically after the directory is
complete. Everything is written into `step_000050.partial/` first and renamed at the end, so a
crash at any point leaves the previous checkpoint as `latest`. The newest `keep_last` complete
checkpoints are kept.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import numpy as np
import torch
import torch.distributed as dist

from megarl.checkpoint.model_io import model_sharded_state_dict
from megarl.checkpoint.megatron_layout import unwrap
from megarl.metrics import METRICS_FILE

if TYPE_CHECKING:
    from megarl.trainer.trainer import Trainer

logger = logging.getLogger(__name__)

COMPLETE = "COMPLETE"
LATEST = "latest"
FORMAT = 1
OPTIMIZER_FORMAT = {"distrib_optim_sharding_type": "fully_reshardable"}


class CheckpointError(RuntimeError):
    """A checkpoint that should be resumed from is missing, incomplete or unreadable."""


class Checkpointer:
    def __init__(self, cfg, ctx, output_dir: Path) -> None:
        self.cfg, self.ctx = cfg, ctx
        self.dir = Path(cfg.checkpoint.dir) if cfg.checkpoint.dir else output_dir / "checkpoints"
        self.output_dir = output_dir
        self._trainer_state: Optional[dict] = None

    # --- save ----------------------------------------------------------------------------------

    def save(self, trainer: "Trainer", step: int) -> Path:
        final = self.dir / f"step_{step:06d}"
        staging = self.dir / f"step_{step:06d}.partial"
        if self.ctx.rank == 0:
            shutil.rmtree(staging, ignore_errors=True)   # left by an earlier crash
            (staging / "rng").mkdir(parents=True)
            (staging / "dist").mkdir()
        dist.barrier()
        from megatron.core import dist_checkpointing

        dist_checkpointing.save(self._sharded_state(trainer, is_loading=False),
                                str(staging / "dist"))
        torch.save(_rng_state(), staging / "rng" / f"rank_{self.ctx.rank}.pt")
        state = self._trainer_state_of(trainer, step)   # collective (intervention state)
        if self.ctx.rank == 0:
            torch.save(state, staging / "trainer.pt")
            metrics = self.output_dir / METRICS_FILE
            if metrics.is_file():
                shutil.copyfile(metrics, staging / METRICS_FILE)
        dist.barrier()
        if self.ctx.rank == 0:
            (staging / COMPLETE).write_text(json.dumps({"step": step, "format": FORMAT}))
            if final.exists():
                shutil.rmtree(final)
            os.replace(staging, final)
            _write_pointer(self.dir, final.name)
            self._prune()
        dist.barrier()
        return final

    def _sharded_state(self, trainer: "Trainer", *, is_loading: bool) -> dict[str, Any]:
        state = model_sharded_state_dict(trainer.actor.model)
        # Optimizer state in the canonical per-parameter layout, so that a run can resume at
        # another TP/PP/DP (megatron-core 0.16's default model-space format is refused by its
        # own checkpoint validation).
        state["optimizer"] = trainer.actor.optimizer.sharded_state_dict(
            state, is_loading=is_loading, metadata=OPTIMIZER_FORMAT)
        return state

    def _trainer_state_of(self, trainer: "Trainer", step: int) -> dict[str, Any]:
        objective = trainer.actor.from_last_stage(trainer.objective.state_dict())
        return {
            "format": FORMAT,
            "step": step,
            "scheduler": trainer.actor.scheduler.state_dict(),
            "objective": objective,
            "sampler": trainer.sampler.state_dict() if trainer.sampler is not None else None,
            "monitor": trainer.monitor.state_dict(),
            "actor": {"num_skipped_steps": trainer.actor.num_skipped_steps,
                      "consecutive_skipped_steps": trainer.actor.consecutive_skipped_steps},
            "layout": {"tp": self.ctx.tp, "pp": self.ctx.pp, "dp": self.ctx.dp,
                       "world_size": self.ctx.world_size},
        }

    def _prune(self) -> None:
        complete = sorted(p for p in self.dir.glob("step_*") if (p / COMPLETE).is_file())
        for old in complete[: -self.cfg.checkpoint.keep_last]:
            shutil.rmtree(old, ignore_errors=True)

    # --- resume --------------------------------------------------------------------------------

    def find(self) -> Optional[Path]:
        """The checkpoint to resume from per `checkpoint.resume`, or None for a fresh start."""
        mode = self.cfg.checkpoint.resume
        if mode == "never":
            return None
        if mode != "auto":
            return _checked(Path(mode))
        pointer = self.dir / LATEST
        if not pointer.is_file():
            if any(self.dir.glob("step_*[0-9]")):
                raise CheckpointError(
                    f"{self.dir} holds checkpoints but no '{LATEST}' pointer; pass "
                    "checkpoint.resume=<path of one checkpoint> or checkpoint.resume=never"
                )
            return None
        name = pointer.read_text().strip()
        return _checked(self.dir / name, pointer)

    def resume(self, trainer: "Trainer") -> int:
        """Load the checkpoint `find()` names into the trainer; returns its step (0 if none)."""
        path = self.find()
        if path is None:
            return 0
        from megatron.core import dist_checkpointing

        try:
            state = torch.load(path / "trainer.pt", weights_only=False)
            loaded = dist_checkpointing.load(self._sharded_state(trainer, is_loading=True),
                                             str(path / "dist"))
        except Exception as exc:  # noqa: BLE001 - any read failure names the checkpoint
            raise CheckpointError(f"cannot read checkpoint {path}: {type(exc).__name__}: {exc}") from exc
        for i, chunk in enumerate(trainer.actor.model):
            unwrap(chunk).load_state_dict(loaded[f"model{i}"], strict=False)
        trainer.actor.optimizer.load_state_dict(loaded["optimizer"])
        trainer.actor.scheduler.load_state_dict(state["scheduler"])
        trainer.objective.load_state_dict(state["objective"])
        trainer.actor.num_skipped_steps = state["actor"]["num_skipped_steps"]
        trainer.actor.consecutive_skipped_steps = state["actor"]["consecutive_skipped_steps"]
        if trainer.sampler is not None and state["sampler"] is not None:
            trainer.sampler.load_state_dict(state["sampler"])
        self._restore_rng(path, state["layout"])
        self._restore_metrics(path)
        self._trainer_state = state
        if self.ctx.rank == 0:
            logger.info("resumed from %s (step %d)", path, state["step"])
        return int(state["step"])

    def restore_monitor(self, trainer: "Trainer") -> None:
        """The monitor is built after resume() (it needs the start step); restore it now."""
        if self._trainer_state is not None:
            trainer.monitor.load_state_dict(self._trainer_state["monitor"])

    def _restore_rng(self, path: Path, layout: dict) -> None:
        rng = path / "rng" / f"rank_{self.ctx.rank}.pt"
        if layout["world_size"] != self.ctx.world_size or not rng.is_file():
            if self.ctx.rank == 0:
                logger.warning("the checkpoint was written by %d ranks (now %d): random "
                               "generators start fresh", layout["world_size"], self.ctx.world_size)
            return
        _set_rng_state(torch.load(rng, weights_only=False))

    def _restore_metrics(self, path: Path) -> None:
        saved, current = path / METRICS_FILE, self.output_dir / METRICS_FILE
        if self.ctx.rank == 0 and saved.is_file() and not current.is_file():
            self.output_dir.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(saved, current)


def _checked(path: Path, pointer: Optional[Path] = None) -> Path:
    where = f" (named by {pointer})" if pointer else ""
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path}{where} does not exist")
    for part in (COMPLETE, "trainer.pt", "dist"):
        if not (path / part).exists():
            raise CheckpointError(
                f"checkpoint {path}{where} is incomplete: {path / part} is missing; it was "
                "probably cut off while being written. Resume from an older one with "
                "checkpoint.resume=<path>"
            )
    return path


def _write_pointer(directory: Path, name: str) -> None:
    tmp = directory / f".{LATEST}.tmp"
    tmp.write_text(name + "\n")
    os.replace(tmp, directory / LATEST)


def _rng_state() -> dict[str, Any]:
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    return {
        "python": random.getstate(), "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "tracker": get_cuda_rng_tracker().get_states(),
    }


def _set_rng_state(state: dict[str, Any]) -> None:
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    get_cuda_rng_tracker().set_states(state["tracker"])
