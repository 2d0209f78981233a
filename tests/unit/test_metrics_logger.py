"""The metrics logger: metrics.jsonl (append-safe resume), TensorBoard, W&B, rank gating."""

from __future__ import annotations

import json
import math
import sys
import types

import numpy as np
import pytest
import torch

from megarl.config import LoggingConfig
from megarl.metrics import MetricsLogger, PhaseTimer, read_metrics


def cfg(tmp_path, **kw) -> LoggingConfig:
    return LoggingConfig(output_dir=str(tmp_path / "run"), tensorboard=False, **kw)


def lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_every_step_is_one_json_line(tmp_path):
    with MetricsLogger(cfg(tmp_path), enabled=True) as logger:
        logger.log(1, {"reward/mean": 0.5, "entropy/mean": torch.tensor(0.8),
                       "ppo/clip_frac_high": np.float32(0.25), "aer/alpha": 0})
        logger.log(2, {"reward/mean": float("nan"), "time/rollout": 1.5})
        logger.log(2, {"eval/aime24/maj@4": 0.1})  # evaluation of the same step
    records = lines(logger.path)
    assert [r["step"] for r in records] == [1, 2, 2]
    assert records[0]["entropy/mean"] == pytest.approx(0.8)
    assert records[0]["ppo/clip_frac_high"] == 0.25 and records[0]["aer/alpha"] == 0.0
    assert records[1]["reward/mean"] is None  # JSON has no NaN
    assert all(isinstance(r["wall_time"], float) for r in records)
    merged = read_metrics(tmp_path / "run")
    assert [r["step"] for r in merged] == [1, 2]
    assert math.isnan(merged[1]["reward/mean"]) and merged[1]["eval/aime24/maj@4"] == 0.1


def test_resume_drops_steps_written_after_the_checkpoint(tmp_path):
    with MetricsLogger(cfg(tmp_path), enabled=True) as logger:
        for step in range(1, 8):
            logger.log(step, {"reward/mean": step})
    # The run crashed after step 7; its last checkpoint is step 5, so it resumes at 6.
    with open(logger.path, "a") as f:
        f.write('{"step": 8, "reward/me')  # torn last line of the crash
    with MetricsLogger(cfg(tmp_path), enabled=True, start_step=6) as logger:
        for step in range(6, 10):
            logger.log(step, {"reward/mean": 10 * step})
    records = lines(logger.path)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6, 7, 8, 9]
    assert [r["reward/mean"] for r in records[4:]] == [5, 60, 70, 80, 90]


def test_appending_without_resume_keeps_everything_and_refuses_going_back(tmp_path):
    with MetricsLogger(cfg(tmp_path), enabled=True) as logger:
        logger.log(3, {"a/b": 1.0})
    with MetricsLogger(cfg(tmp_path), enabled=True) as logger:
        with pytest.raises(ValueError, match="step 2 comes after step 3"):
            logger.log(2, {"a/b": 1.0})
        logger.log(4, {"a/b": 2.0})
    assert [r["step"] for r in lines(logger.path)] == [3, 4]


def test_bad_values_are_named(tmp_path):
    with MetricsLogger(cfg(tmp_path), enabled=True) as logger:
        with pytest.raises(TypeError, match="'phase/name' is a string"):
            logger.log(1, {"phase/name": "rollout"})
        with pytest.raises(TypeError, match="'x/y' = \\[1, 2\\] is not a number"):
            logger.log(1, {"x/y": [1, 2]})
        with pytest.raises(ValueError, match="'step' is reserved"):
            logger.log(1, {"step": 1})


def test_only_the_logging_rank_writes(tmp_path):
    logger = MetricsLogger(cfg(tmp_path), enabled=False)
    logger.log(1, {"reward/mean": 1.0})
    logger.close()
    assert not (tmp_path / "run").exists()
    # Outside a process group this process is the logging rank.
    with MetricsLogger(cfg(tmp_path)) as logger:
        assert logger.enabled


def test_tensorboard_events_are_readable(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config = LoggingConfig(output_dir=str(tmp_path / "run"), tensorboard=True)
    with MetricsLogger(config, enabled=True) as logger:
        for step in range(1, 4):
            logger.log(step, {"reward/mean": 0.1 * step, "entropy/mean": float("inf")})
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    scalars = events.Scalars("reward/mean")
    assert [e.step for e in scalars] == [1, 2, 3]
    assert [e.value for e in scalars] == pytest.approx([0.1, 0.2, 0.3])
    assert "entropy/mean" not in events.Tags()["scalars"]  # non-finite only in metrics.jsonl


def test_wandb_missing_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import fails as if not installed
    with pytest.raises(ImportError, match="logging.wandb is true but the wandb package is not"):
        MetricsLogger(cfg(tmp_path, wandb=True), enabled=True)


def test_wandb_run_is_resumed_by_id(tmp_path, monkeypatch):
    calls = []

    class FakeRun:
        def log(self, data, step):
            calls.append(("log", step, data))

        def finish(self):
            calls.append(("finish",))

    def init(**kwargs):
        calls.append(("init", kwargs))
        return FakeRun()

    fake = types.SimpleNamespace(init=init,
                                 util=types.SimpleNamespace(generate_id=lambda: "abc123"))
    monkeypatch.setitem(sys.modules, "wandb", fake)
    config = cfg(tmp_path, wandb=True, wandb_project="proj")
    for step in (1, 2):
        with MetricsLogger(config, enabled=True, start_step=step,
                           run_config={"trainer": {"seed": 1}}) as logger:
            logger.log(step, {"reward/mean": 1.0, "entropy/mean": float("nan")})
    inits = [c[1] for c in calls if c[0] == "init"]
    assert [i["id"] for i in inits] == ["abc123", "abc123"]  # the second run resumes the first
    assert inits[0]["project"] == "proj" and inits[0]["name"] == "run"
    assert inits[0]["resume"] == "allow" and inits[0]["config"] == {"trainer": {"seed": 1}}
    assert ("log", 2, {"reward/mean": 1.0}) in calls


def test_phase_timer(monkeypatch):
    clock = iter([0.0, 1.0, 3.0, 4.0, 4.5, 10.0])
    monkeypatch.setattr("megarl.metrics.timer.time.perf_counter", lambda: next(clock))
    timer = PhaseTimer(synchronize=False)
    with timer.phase("rollout"):
        pass
    with timer.phase("train"):
        pass
    assert timer.metrics() == {"time/rollout": 2.0, "time/train": 0.5, "time/step": 10.0}


def test_training_monitor_adds_the_law_logs_and_resumes(tmp_path, capsys):
    from megarl.config import TrainerConfig
    from megarl.metrics import TrainingMonitor

    logging_cfg = cfg(tmp_path, progress="off", log_interval=2)
    trainer_cfg = TrainerConfig(num_steps=6, entropy_law_min_steps=3)

    def metrics(step):
        entropy = 1.0 / step
        return {"entropy/mean": entropy, "reward/mean": -0.3 * math.exp(entropy) + 0.9,
                "time/rollout": 1.0}

    with TrainingMonitor(logging_cfg, trainer_cfg, enabled=True) as monitor:
        logged = [monitor.step(step, metrics(step)) for step in range(1, 4)]
        checkpoint = monitor.state_dict()  # the run's last checkpoint is step 3
        logged.append(monitor.step(4, metrics(4)))
        monitor.log(4, {"eval/average/maj@4": 0.5})
    assert "entropy_law/a" not in logged[1] and logged[2]["entropy_law/a"] == pytest.approx(0.3)
    assert logged[3]["entropy_law/ceiling"] == pytest.approx(0.6)
    assert "train: step 4/6 (67%) | reward" in capsys.readouterr().err
    # It crashed after step 4 and resumes from step 3: step 4 is redone, the fit goes on from
    # the checkpoint's three points.
    with TrainingMonitor(logging_cfg, trainer_cfg, start_step=4, enabled=True) as monitor:
        monitor.load_state_dict(checkpoint)
        redone = monitor.step(4, metrics(4))
    assert redone == logged[3]
    records = read_metrics(tmp_path / "run")
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert "eval/average/maj@4" not in records[3]  # dropped with the redone step
    assert records[3]["entropy_law/b"] == pytest.approx(0.9)


def _log_on_every_rank(output_dir: str) -> bool:
    """Run on each gloo rank: every rank logs, as the trainer does."""
    logger = MetricsLogger(LoggingConfig(output_dir=output_dir, tensorboard=False))
    logger.log(1, {"reward/mean": 1.0})
    logger.close()
    return logger.enabled


def test_only_rank_zero_of_a_process_group_writes(tmp_path):
    from tests.harness import run_distributed

    enabled = run_distributed(_log_on_every_rank, world_size=2, args=(str(tmp_path / "run"),))
    assert enabled == [True, False]
    assert [r["step"] for r in lines(tmp_path / "run" / "metrics.jsonl")] == [1]
