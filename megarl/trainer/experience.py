"""From a rollout batch to the actor's samples: advantages, rollout metrics, record and replay.

A recorded step is one JSON file (`<output_dir>/rollouts/step_000012.json`) holding the rollout
batch exactly as the servers produced it; replaying a directory of them trains the actor with
no server at all (`trainer.replay_dir`).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from megarl.actor.experience import Sample
from megarl.config import AlgorithmConfig
from megarl.rollout.batch import RolloutBatch
from megarl.trainer.advantages import advantages_from_config


def samples_from_batch(batch: RolloutBatch, algorithm: AlgorithmConfig) -> list[Sample]:
    """One `Sample` per response, with its advantage."""
    if len(batch) == 0:
        raise RuntimeError("the rollout produced no response: nothing to train on")
    rewards = torch.tensor(batch.rewards, dtype=torch.float64)
    groups = torch.tensor(batch.group_ids, dtype=torch.long)
    lengths = torch.tensor([len(r) for r in batch.response_token_ids], dtype=torch.float64)
    advantages = advantages_from_config(rewards, groups, algorithm, response_lengths_N=lengths)
    return [
        Sample(prompt_ids=list(p), response_ids=list(r), group=int(g), reward=float(w),
               advantage=float(a), rollout_log_probs=list(lp), finish_reason=str(f),
               counts_in_loss=bool(m))
        for p, r, g, w, a, lp, f, m in zip(
            batch.prompt_token_ids, batch.response_token_ids, batch.group_ids, batch.rewards,
            advantages.tolist(), batch.rollout_logprobs, batch.finish_reasons, batch.loss_mask)
    ]


def rollout_metrics(batch: RolloutBatch) -> dict[str, float]:
    """Reward, length and filtering figures of a rollout batch (task reward before shaping)."""
    task = torch.tensor(batch.task_rewards or batch.rewards, dtype=torch.float64)
    lengths = torch.tensor([len(r) for r in batch.response_token_ids], dtype=torch.float64)
    metrics = {
        "reward/mean": float(task.mean()),
        "reward/std": float(task.std()) if len(task) > 1 else 0.0,
        "reward/shaped_mean": float(torch.tensor(batch.rewards, dtype=torch.float64).mean()),
        "response_length/mean": float(lengths.mean()),
        "response_length/max": float(lengths.max()),
        "response_length/min": float(lengths.min()),
        "response_length/truncated_frac": float(sum(batch.truncated)) / max(len(batch), 1),
        "prompt_length/mean": float(sum(map(len, batch.prompt_token_ids))) / max(len(batch), 1),
    }
    for key, value in batch.counts.items():
        metrics[f"rollout/{key}"] = float(value)
    return metrics


def record(batch: RolloutBatch, directory: str | Path, step: int) -> Path:
    """Write the step's rollout batch (atomically: a partial file never has the final name)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"step_{step:06d}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"step": step, "batch": batch.as_dict()}))
    tmp.replace(path)
    return path


def replay(directory: str | Path, step: int) -> RolloutBatch:
    """The recorded rollout batch of `step`; a clear error if it is missing or broken."""
    path = Path(directory) / f"step_{step:06d}.json"
    if not path.is_file():
        available = sorted(p.name for p in Path(directory).glob("step_*.json"))
        raise FileNotFoundError(
            f"trainer.replay_dir: no recorded rollout for step {step} ({path}); "
            f"recorded: {', '.join(available[:5]) or 'none'}{' ...' if len(available) > 5 else ''}"
        )
    try:
        data = json.loads(path.read_text())
        return RolloutBatch.from_dict(data["batch"])
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{path}: not a recorded rollout batch ({exc})") from None


def mean_over_steps(history: list[dict[str, float]]) -> dict[str, float]:
    """Average each metric over the optimizer steps of one training step (NaN-free values)."""
    out: dict[str, float] = {}
    for key in {k for h in history for k in h}:
        values = [h[key] for h in history if key in h and math.isfinite(h[key])]
        if values:
            out[key] = sum(values) / len(values)
    out["optim/steps"] = float(len(history))
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """`obj` from global rank `src` on every trainer rank (pickled; for small control data)."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return obj
    box = [obj if dist.get_rank() == src else None]
    dist.broadcast_object_list(box, src=src)
    return box[0]
