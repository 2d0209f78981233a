"""End to end on CPU: `megarl.trainer.loop.train` with the dev server behind sglang-router.

TP=2 and PP=2 trainers run 3 steps of GRPO + SIREN; losses are finite, metrics are written,
and after every sync each server's weights are checked against the trainer's (sync.verify).
"""

from __future__ import annotations

import json
import math

import pytest

from megarl.config import from_dict
from megarl.trainer.loop import train
from tests.fixtures.tiny_model import build_tiny_model
from tests.harness import run_distributed


def write_prompts(path, n=16):
    with open(path, "w") as f:
        for i in range(n):
            a, b = i % 5, (3 * i) % 7
            f.write(json.dumps({"prompt": f"{a}+{b}=", "answer": str(a + b)}) + "\n")
    return str(path)


def demo_like_config(tmp_path, *, tp=1, pp=1, steps=3, port=0, **extra):
    model = build_tiny_model(tmp_path / "model")
    data = write_prompts(tmp_path / "prompts.jsonl")
    base = {
        "model": {"hf_dir": str(model), "dtype": "float32", "make_vocab_size_divisible_by": 16},
        "parallel": {"tp": tp, "pp": pp},
        "optimizer": {"lr": 1e-3},
        "rollout": {"backend": "dev", "num_servers": 1, "use_router": True,
                    "base_port": port or 31000 + (tp * 10 + pp) * 7, "router_port": 0,
                    "prompts_per_step": 4, "samples_per_prompt": 4, "max_new_tokens": 6,
                    "health_timeout_s": 120},
        "sync": {"verify": True, "bucket_mb": 0.01},
        "algorithm": {"micro_batch_tokens": 64},
        "entropy": {"intervention": "siren"},
        "data": {"train_files": [data], "apply_chat_template": True, "max_prompt_tokens": 64},
        "checkpoint": {"save_interval": 0},
        "logging": {"output_dir": str(tmp_path / "run"), "tensorboard": True, "progress": "off"},
        "trainer": {"num_steps": steps, "seed": 3},
    }
    for section, values in extra.items():
        base.setdefault(section, {}).update(values)
    return from_dict(base)


def _train(cfg):
    return train(cfg)


def _read_metrics(run_dir):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


@pytest.mark.parametrize("tp, pp", [(2, 1), (1, 2)])
def test_three_steps_with_dev_server_and_router(tmp_path, tp, pp):
    cfg = demo_like_config(tmp_path, tp=tp, pp=pp)
    assert run_distributed(_train, tp * pp, args=(cfg,), timeout=600) == [3] * (tp * pp)
    records = [r for r in _read_metrics(tmp_path / "run") if "loss/total" in r]
    assert [r["step"] for r in records] == [1, 2, 3]
    for r in records:
        for key in ("loss/total", "entropy/mean", "entropy/nucleus_mean", "reward/mean",
                    "time/rollout", "time/train", "time/sync", "sync/num_bytes"):
            assert key in r and math.isfinite(r[key]), key
        assert r["optim/step_applied"] == 1.0
    assert list((tmp_path / "run" / "tensorboard").glob("events.*"))
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text().strip() == "step_000003"


def test_record_then_replay_trains_without_servers(tmp_path):
    recorded = demo_like_config(tmp_path / "a", tp=2, steps=2, port=31500,
                                trainer={"record_rollouts": True})
    run_distributed(_train, 2, args=(recorded,), timeout=600)
    rollouts = tmp_path / "a" / "run" / "rollouts"
    assert sorted(p.name for p in rollouts.iterdir()) == ["step_000001.json", "step_000002.json"]

    replayed = demo_like_config(tmp_path / "b", tp=2, steps=2, port=31500,
                                trainer={"replay_dir": str(rollouts)})
    run_distributed(_train, 2, args=(replayed,), timeout=600)
    first = [r for r in _read_metrics(tmp_path / "a" / "run") if "loss/total" in r]
    again = [r for r in _read_metrics(tmp_path / "b" / "run") if "loss/total" in r]
    assert [r["reward/mean"] for r in again] == [r["reward/mean"] for r in first]
    assert not any(k.startswith("sync/") for r in again for k in r)   # no server, no sync
    assert not (tmp_path / "b" / "run" / "logs").exists()             # nothing was started
    # Same data, same initial weights: the replayed update equals the recorded run's.
    for a, b in zip(first, again):
        assert abs(a["loss/total"] - b["loss/total"]) < 1e-6


def _train_expecting_checkpoint_error(cfg):
    from megarl.trainer.checkpoint import CheckpointError

    try:
        train(cfg)
    except CheckpointError as exc:
        return str(exc)
    return None


def test_a_broken_checkpoint_fails_before_any_server_starts(tmp_path):
    cfg = demo_like_config(tmp_path, tp=1, steps=2, port=31700)
    checkpoints = tmp_path / "run" / "checkpoints"
    checkpoints.mkdir(parents=True)
    (checkpoints / "latest").write_text("step_000004\n")   # names a checkpoint that is gone
    [message] = run_distributed(_train_expecting_checkpoint_error, 1, args=(cfg,), timeout=300)
    assert message is not None and "step_000004" in message
    assert not (tmp_path / "run" / "logs").exists(), "servers were started for a run that failed"
