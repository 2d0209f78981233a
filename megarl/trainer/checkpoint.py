"""Resumable checkpoints of a training run: written whole or not at all, checked when read.

Layout of `<checkpoint.dir>/step_000050/`:
  dist/          model and optimizer state, a Megatron distributed checkpoint (torch_dist) in
                 model space, so it loads at any TP/PP/DP
  trainer.pt     step, LR schedule, intervention state (SIREN anchor, AER alpha...), data
                 cursor, monitor state (entropy-law points), skipped-step counters, the layout
  metrics.jsonl  the metrics history up to this step
  rng/rank_N.pt  each rank's random generators (restored when the layout is unchanged)
  COMPLETE       written last: the step and the size of every file above; a directory
                 without it is not a checkpoint
and `<checkpoint.dir>/latest`, a one-line pointer replaced atomically after the directory is
complete. Everything is written into `step_000050.partial/` first and renamed at the end, so a
crash at any point leaves the previous checkpoint as `latest`. The newest `keep_last` complete
checkpoints are kept.

Resuming (`checkpoint.resume`: auto, never, or a path) checks the checkpoint before reading it:
a missing, truncated or unreadable file is a `CheckpointError` naming that file, never a fresh
start. auto takes the checkpoint `latest` names, or a newer sealed one that a crash between
its rename and the pointer update left behind. A checkpoint written at another TP/PP/DP loads
resharded; its random generators are then not restored (a warning says so). The LR schedule
follows the config (a changed `trainer.num_steps` re-stretches it; differences from the
checkpoint are logged).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import re
import shutil
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import numpy as np
import torch
import torch.distributed as dist

from megarl.checkpoint.dist_io import in_process_strategy
from megarl.checkpoint.megatron_layout import unwrap
from megarl.checkpoint.model_io import model_sharded_state_dict
from megarl.metrics import METRICS_FILE

if TYPE_CHECKING:
    from megarl.trainer.trainer import Trainer

logger = logging.getLogger(__name__)

COMPLETE = "COMPLETE"
LATEST = "latest"
FORMAT = 2
OPTIMIZER_FORMAT = {"distrib_optim_sharding_type": "fully_reshardable"}
_NAME = re.compile(r"step_(\d+)")
_SCHEDULE_KEYS = ("max_lr", "min_lr", "lr_warmup_steps", "lr_decay_steps", "lr_decay_style")


class CheckpointError(RuntimeError):
    """A checkpoint that should be resumed from is missing, incomplete or unreadable."""


class Checkpointer:
    """Saves and resumes the whole state of a run (see the module docstring)."""

    def __init__(self, cfg, ctx, output_dir: Path) -> None:
        self.cfg, self.ctx = cfg, ctx
        self.dir = Path(cfg.checkpoint.dir) if cfg.checkpoint.dir else output_dir / "checkpoints"
        self.output_dir = output_dir
        self.last_saved_step: Optional[int] = None
        self._trainer_state: Optional[dict] = None

    # --- save ----------------------------------------------------------------------------------

    def save(self, trainer: "Trainer", step: int) -> Path:
        """Write the checkpoint of `step` (collective); a second call for the same step is a
        no-op (a stop requested at a step that was just saved)."""
        final = self.dir / f"step_{step:06d}"
        if self.last_saved_step == step:
            return final
        staging = self.dir / f"step_{step:06d}.partial"
        if self.ctx.rank == 0:
            shutil.rmtree(staging, ignore_errors=True)   # left by an earlier crash
            (staging / "rng").mkdir(parents=True)
            (staging / "dist").mkdir()
        dist.barrier()
        from megatron.core import dist_checkpointing

        # In-process writer: Megatron's default starts helper processes (spawn method), which
        # costs seconds per save and needs a main guard in the user's script.
        sharded = self._sharded_state(trainer, is_loading=False,
                                      optimizer=self.cfg.checkpoint.save_optimizer)
        dist_checkpointing.save(sharded, str(staging / "dist"),
                                sharded_strategy=in_process_strategy())
        torch.save(_rng_state(), staging / "rng" / f"rank_{self.ctx.rank}.pt")
        state = self._trainer_state_of(trainer, step)   # collective (intervention state)
        if self.ctx.rank == 0:
            torch.save(state, staging / "trainer.pt")
            metrics = self.output_dir / METRICS_FILE
            if metrics.is_file():
                shutil.copyfile(metrics, staging / METRICS_FILE)
        dist.barrier()
        if self.ctx.rank == 0:
            self._publish(staging, final, step)
        dist.barrier()
        self.last_saved_step = step
        return final

    def _publish(self, staging: Path, final: Path, step: int) -> None:
        """Seal the staged directory, give it its final name, then point `latest` at it. A
        crash before the rename leaves only a `.partial` directory, which nothing reads."""
        self._seal(staging, step)
        if final.exists():
            shutil.rmtree(final)
        os.replace(staging, final)
        _write_pointer(self.dir, final.name)
        self._prune()
        logger.info("checkpoint %s written", final)

    @staticmethod
    def _seal(staging: Path, step: int) -> None:
        """Write COMPLETE: the step and every file's size, checked before a resume."""
        files = {str(p.relative_to(staging)): p.stat().st_size
                 for p in sorted(staging.rglob("*")) if p.is_file()}
        (staging / COMPLETE).write_text(json.dumps({"step": step, "format": FORMAT,
                                                    "files": files}))

    def _sharded_state(self, trainer: "Trainer", *, is_loading: bool,
                       optimizer: bool = True) -> dict[str, Any]:
        state = model_sharded_state_dict(trainer.actor.model)
        if optimizer:
            if is_loading:
                _give_optimizer_state(trainer.actor.optimizer)
            # Optimizer state in the canonical per-parameter layout, so that a run can resume
            # at another TP/PP/DP (megatron-core 0.16's default model-space format is refused
            # by its own checkpoint validation).
            with _bucket_aligned_world_state(trainer.actor.optimizer):
                state["optimizer"] = trainer.actor.optimizer.sharded_state_dict(
                    state, is_loading=is_loading, metadata=OPTIMIZER_FORMAT)
        return state

    def _trainer_state_of(self, trainer: "Trainer", step: int) -> dict[str, Any]:
        objective = trainer.actor.from_last_stage(trainer.objective.state_dict())
        return {
            "format": FORMAT,
            "step": step,
            "has_optimizer": self.cfg.checkpoint.save_optimizer,
            "scheduler": trainer.actor.scheduler.state_dict(),
            "objective": objective,
            "sampler": trainer.sampler.state_dict() if trainer.sampler is not None else None,
            "monitor": trainer.monitor.state_dict(),
            "actor": {"num_skipped_steps": trainer.actor.num_skipped_steps,
                      "consecutive_skipped_steps": trainer.actor.consecutive_skipped_steps},
            "layout": _layout(self.ctx),
        }

    def _prune(self) -> None:
        for old in _sealed(self.dir)[: -self.cfg.checkpoint.keep_last]:
            shutil.rmtree(old, ignore_errors=True)
        for staged in self.dir.glob("step_*.partial"):   # earlier crashes; we are the writer
            shutil.rmtree(staged, ignore_errors=True)

    # --- resume --------------------------------------------------------------------------------

    def find(self) -> Optional[Path]:
        """The checked checkpoint to resume from per `checkpoint.resume`, or None for a fresh
        start; a CheckpointError naming the file when it is missing, incomplete or truncated.

        auto: the checkpoint `latest` names or, when a crash came between a rename and the
        pointer update, the newer sealed one, so that no finished step is lost."""
        mode = self.cfg.checkpoint.resume
        if mode == "never":
            return None
        if mode != "auto":
            return _checked(Path(mode))
        pointer = self.dir / LATEST
        sealed = _sealed(self.dir)
        named = None
        if pointer.is_file():
            name = pointer.read_text(errors="replace").strip()
            if not _NAME.fullmatch(name):
                raise CheckpointError(f"{pointer} is corrupt: it holds {name[:60]!r}, not the "
                                      "name of a checkpoint; pass checkpoint.resume=<path>")
            named = _checked(self.dir / name, pointer)
        if sealed and (named is None or _step_of(sealed[-1]) > _step_of(named)):
            logger.warning("%s is newer than what '%s' names (a crash before the pointer was "
                           "updated): resuming from it", sealed[-1], LATEST)
            return _checked(sealed[-1])
        if named is None and self.dir.is_dir() and any(
                _NAME.fullmatch(p.name) for p in self.dir.iterdir()):
            raise CheckpointError(f"{self.dir} holds checkpoint directories but none is sealed "
                                  f"({COMPLETE} missing): pass checkpoint.resume=<path> or "
                                  "checkpoint.resume=never")
        return named

    def resume(self, trainer: "Trainer") -> int:
        """Load the checkpoint `find()` names into the trainer; returns its step (0 if none)."""
        path = self.find()
        if path is None:
            return 0
        state = _torch_load(path / "trainer.pt")
        has_optimizer = bool(state.get("has_optimizer", True))
        loaded = self._load_dist(trainer, path / "dist", has_optimizer)
        for i, chunk in enumerate(trainer.actor.model):
            unwrap(chunk).load_state_dict(loaded[f"model{i}"], strict=True)
        if has_optimizer:
            _load_optimizer(trainer.actor.optimizer, loaded["optimizer"])
        elif self.ctx.rank == 0:
            logger.warning("%s has no optimizer state (checkpoint.save_optimizer was false): "
                           "the optimizer starts fresh, so this resume is not exact", path)
        self._restore_scheduler(trainer.actor.scheduler, state["scheduler"])
        trainer.objective.load_state_dict(state["objective"])
        trainer.actor.num_skipped_steps = state["actor"]["num_skipped_steps"]
        trainer.actor.consecutive_skipped_steps = state["actor"]["consecutive_skipped_steps"]
        self._restore_sampler(trainer, state["sampler"])
        self._restore_rng(path, state["layout"])
        self._restore_metrics(path)
        self._trainer_state = state
        self.last_saved_step = int(state["step"])
        if self.ctx.rank == 0:
            logger.info("resumed from %s (step %d)", path, state["step"])
        return int(state["step"])

    def _load_dist(self, trainer: "Trainer", directory: Path, optimizer: bool) -> dict:
        from megatron.core import dist_checkpointing

        sharded = self._sharded_state(trainer, is_loading=True, optimizer=optimizer)
        try:
            return dist_checkpointing.load(sharded, str(directory))
        except Exception as exc:  # noqa: BLE001 - any read failure names the checkpoint part
            raise CheckpointError(f"cannot read the model/optimizer state in {directory}: "
                                  f"{type(exc).__name__}: {exc}") from exc

    def _restore_scheduler(self, scheduler, saved: dict) -> None:
        """The saved step count, with the schedule of the config (Megatron would assert that
        the two schedules are equal, which forbids extending a run)."""
        keys = _SCHEDULE_KEYS
        if saved.get("lr_decay_style") == scheduler.lr_decay_style == "constant":
            keys = tuple(k for k in keys if k != "lr_decay_steps")   # a constant has no length
        changed = [f"{k} {saved[k]} -> {getattr(scheduler, k)}" for k in keys
                   if k in saved and saved[k] != getattr(scheduler, k)]
        if changed and self.ctx.rank == 0:
            logger.warning("the LR schedule of the config differs from the checkpoint's (%s): "
                           "using the config's", ", ".join(changed))
        scheduler.override_opt_param_scheduler = True
        scheduler.load_state_dict(saved)

    def _restore_sampler(self, trainer: "Trainer", saved: Optional[dict]) -> None:
        if trainer.sampler is None:
            return
        if saved is None:
            logger.warning("the checkpoint has no data cursor (it was written by a replay run): "
                           "prompts start from the beginning of the dataset")
            return
        trainer.sampler.load_state_dict(saved)

    def restore_monitor(self, trainer: "Trainer") -> None:
        """The monitor is built after resume() (it needs the start step); restore it now."""
        if self._trainer_state is not None:
            trainer.monitor.load_state_dict(self._trainer_state["monitor"])

    def _restore_rng(self, path: Path, layout: dict) -> None:
        now = _layout(self.ctx)
        if {k: layout.get(k) for k in now} != now:
            if self.ctx.rank == 0:
                logger.warning("the checkpoint was written at %s, this run is %s: random "
                               "generators start fresh", _describe(layout), _describe(now))
            return
        _set_rng_state(_torch_load(path / "rng" / f"rank_{self.ctx.rank}.pt"))

    def _restore_metrics(self, path: Path) -> None:
        saved, current = path / METRICS_FILE, self.output_dir / METRICS_FILE
        if self.ctx.rank == 0 and saved.is_file() and not current.is_file():
            self.output_dir.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(saved, current)


def _checked(path: Path, pointer: Optional[Path] = None) -> Path:
    """`path` if it is a complete checkpoint whose files all have their recorded sizes."""
    where = f" (named by {pointer})" if pointer else ""
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path}{where} does not exist")
    hint = ("; it was probably cut off while being written. Resume from an older one with "
            "checkpoint.resume=<path>" + _others(path))
    seal = path / COMPLETE
    if not seal.is_file():
        raise CheckpointError(f"checkpoint {path}{where} is incomplete: {seal} is missing{hint}")
    try:
        files = json.loads(seal.read_text())["files"]
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"checkpoint file {seal} is corrupt ({exc}){hint}") from None
    for name, size in files.items():
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"checkpoint file {file} is missing{hint}")
        if file.stat().st_size != size:
            raise CheckpointError(f"checkpoint file {file} is truncated or damaged: "
                                  f"{file.stat().st_size} bytes, {size} when written{hint}")
    return path


def _sealed(directory: Path) -> list[Path]:
    """The checkpoints in `directory` that have their COMPLETE file, oldest first."""
    if not directory.is_dir():
        return []
    return sorted((p for p in directory.iterdir()
                   if _NAME.fullmatch(p.name) and (p / COMPLETE).is_file()), key=_step_of)


def _others(path: Path) -> str:
    others = [p for p in _sealed(path.parent) if p != path]
    return f" (others: {', '.join(str(p) for p in others)})" if others else ""


def _torch_load(file: Path) -> Any:
    try:
        return torch.load(file, weights_only=False)
    except Exception as exc:  # noqa: BLE001 - any read failure names the file
        raise CheckpointError(f"cannot read checkpoint file {file}: {type(exc).__name__}: "
                              f"{exc}") from exc


def _give_optimizer_state(optimizer) -> None:
    """Megatron's distributed optimizer reads the step count from its torch optimizer's state
    when it builds the state dict to load into; without Apex/TE a fresh one has no state yet.
    Create zero state (the load overwrites it)."""
    from megatron.core.optimizer import distrib_optimizer

    if distrib_optimizer.HAVE_APEX_OR_TE:
        return
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(opt, "optimizer", None)
        for group in inner.param_groups if inner is not None else ():
            for param in group["params"]:
                state = inner.state[param]
                if "step" not in state:
                    state["exp_avg"] = torch.zeros_like(param.data)
                    state["exp_avg_sq"] = torch.zeros_like(param.data)
                    state["step"] = torch.zeros((), dtype=torch.float32)


@contextlib.contextmanager
def _bucket_aligned_world_state(optimizer):
    """Correct megatron-core 0.16's fully_reshardable save for buffers of several buckets.

    `get_parameter_state_dp_zero` gathers the optimizer state of a grad buffer with the padding
    at the end of each bucket removed, but `sharded_param_state_fully_reshardable` slices that
    gathered state with the parameters' offsets in the padded buffer (Megatron's own TODO,
    issue #504). Every parameter after the first bucket then gets a neighbour's state (and
    zeros, with a "param range exceeds unpadded buffer" warning). Buffers have several buckets
    with tied embeddings at PP > 1 and whenever gradient reduction overlaps (all GPU runs).
    For the duration of one `sharded_state_dict` call, the gathered state of each bucket is put
    back at its padded offset, which is what the slicing expects."""
    opts = [o for o in getattr(optimizer, "chained_optimizers", [optimizer])
            if hasattr(o, "get_parameter_state_dp_zero") and hasattr(o, "buffers")]
    for opt in opts:
        opt.get_parameter_state_dp_zero = partial(_padded_world_state, opt,
                                                  opt.get_parameter_state_dp_zero)
    try:
        yield
    finally:
        for opt in opts:
            del opt.get_parameter_state_dp_zero   # back to the class's method


def _padded_world_state(opt, gather, *args, **kwargs):
    state = gather(*args, **kwargs)
    for gbuf_idx, by_dtype in (state or {}).items():
        if not isinstance(gbuf_idx, int):
            continue
        buffer = opt.buffers[gbuf_idx]
        for world in by_dtype.values():
            for key in ("param", "exp_avg", "exp_avg_sq"):
                padded = torch.zeros(buffer.numel, dtype=world[key].dtype)
                offset = 0
                for (start, _), bucket in zip(buffer.bucket_indices, buffer.buckets):
                    padded[start:start + bucket.numel_unpadded] = \
                        world[key][offset:offset + bucket.numel_unpadded]
                    offset += bucket.numel_unpadded
                world[key] = padded
    return state


def _load_optimizer(optimizer, state: Any) -> None:
    """`optimizer.load_state_dict(state)`, working around megatron-core 0.16 without Apex/TE:
    its fully_reshardable load copies every per-parameter state tensor of the torch optimizer
    from the checkpoint, 'step' included, but 'step' is stored per parameter group (KeyError);
    and it gives every parameter the same 'step' tensor, which torch's Adam then increments
    once per parameter. The groups (and 'step') are loaded first, then the parameter state
    with 'step' set aside; each parameter gets its own 'step' back."""
    from megatron.core.optimizer import distrib_optimizer

    chained = getattr(optimizer, "chained_optimizers", [optimizer])
    if distrib_optimizer.HAVE_APEX_OR_TE or not all(
            isinstance(o, distrib_optimizer.DistributedOptimizer) for o in chained):
        optimizer.load_state_dict(state)
        return
    states = [state] if len(chained) == 1 else [v for _, v in sorted(state.items())]
    for opt, sd in zip(chained, states):
        sd = dict(sd)
        param_state = sd.pop("param_state")
        if sd.pop("param_state_sharding_type") != "fully_reshardable":
            raise CheckpointError("the optimizer state is not in the fully_reshardable format")
        opt.load_state_dict(sd)
        steps = {p: s.pop("step") for p, s in opt.optimizer.state.items() if "step" in s}
        try:
            opt.load_parameter_state_from_fully_reshardable(param_state)
        finally:
            for param, step in steps.items():
                opt.optimizer.state[param]["step"] = step.clone()
    if len(chained) > 1:
        optimizer._synchronize_steps()


def _layout(ctx) -> dict[str, int]:
    return {"tp": ctx.tp, "pp": ctx.pp, "dp": ctx.dp, "world_size": ctx.world_size}


def _describe(layout: dict) -> str:
    return f"TP={layout.get('tp')} PP={layout.get('pp')} DP={layout.get('dp')}"


def _step_of(path: Path) -> int:
    return int(_NAME.fullmatch(path.name).group(1))


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
