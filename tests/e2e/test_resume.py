"""Exact resume on CPU, and checkpoints that are cut off, damaged or never renamed.

A 6-step run (A) and a 3-step run resumed for 3 more steps, at the same layout (B), at TP=2
(D) and at PP=2 (P), end with the same weights, optimizer state, LR schedule, intervention
state and metrics (within 1e-6; the same layout is bit-exact).

Rollouts: recorded once from a dev server (`trainer.record_rollouts`) and replayed by every
compared run (`trainer.replay_dir`, no servers). We replay rather than make generation
deterministic because generation is not part of what a checkpoint restores: SGLang's sampling
depends on batching and scheduling, and the servers are restarted with the job anyway. Replays
isolate what the checkpoint must carry; the data cursor, which replays bypass, is checked by
the sampler's unit tests and by the live run of `test_faults`.

This module imports little at the top: the reward workers of the recording run import it.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest

_IGNORED = ("time/", "throughput/", "wall_time")


def varied_reward(response: str, answer: str) -> float:
    """Rewards that differ within a group, so advantages (and gradients) are not zero."""
    return (len(response) % 3) / 2.0


def write_prompts(path: Path, n: int = 24) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"prompt": f"{i % 5}+{i % 7}=", "answer": str(i % 5 + i % 7)})
                    + "\n")
    return path


def run_config(root: Path, model: Path, *, steps: int, **sections):
    from megarl.config import from_dict

    base = {
        "model": {"hf_dir": str(model), "dtype": "float32", "make_vocab_size_divisible_by": 16},
        "optimizer": {"lr": 1e-3},
        "rollout": {"backend": "dev", "num_servers": 1, "use_router": False, "base_port": 0,
                    "prompts_per_step": 4, "samples_per_prompt": 4, "max_new_tokens": 8,
                    "health_timeout_s": 120, "server_args": {"num_threads": 1}},
        "algorithm": {"micro_batch_tokens": 64, "kl_coef": 0.01, "prompts_per_mini_batch": 2},
        "entropy": {"intervention": "aer"},
        "reward": {"function": "tests.e2e.test_resume:varied_reward", "num_workers": 1},
        "data": {"train_files": [str(write_prompts(root / "prompts.jsonl"))],
                 "max_prompt_tokens": 64},
        "checkpoint": {"save_interval": 3},
        "logging": {"output_dir": str(root / "run"), "tensorboard": False, "progress": "off"},
        "trainer": {"num_steps": steps, "seed": 11},
    }
    for section, values in sections.items():
        base.setdefault(section, {}).update(values)
    return from_dict(base)


def _train(cfg):
    """train(cfg) -> (last step, warnings of the checkpointer), or the CheckpointError's text."""
    import logging

    from megarl.trainer.checkpoint import CheckpointError
    from megarl.trainer.loop import train

    seen: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: seen.append(record.getMessage())
    log = logging.getLogger("megarl.trainer.checkpoint")
    log.addHandler(handler)
    try:
        return train(cfg), seen
    except CheckpointError as exc:
        return f"CheckpointError: {exc}"
    finally:
        log.removeHandler(handler)


class SimulatedCrash(Exception):
    pass


def _train_crashing_before_rename(cfg, step: int):
    """train(cfg), dying once checkpoint `step` is complete and sealed but not yet renamed."""
    from megarl.trainer import checkpoint
    from megarl.trainer.loop import train

    original = checkpoint.Checkpointer._seal

    def seal_then_crash(staging, at_step):
        original(staging, at_step)
        if at_step == step:
            raise SimulatedCrash(f"killed before renaming {staging}")

    checkpoint.Checkpointer._seal = staticmethod(seal_then_crash)
    try:
        train(cfg)
    except SimulatedCrash:
        return "crashed"
    finally:
        checkpoint.Checkpointer._seal = staticmethod(original)
    return "finished"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Record 6 steps from a dev server, then A (6 steps), B (3 steps, then resumed to 6) and
    D (B's step 3 resumed at TP=2)."""
    from tests.fixtures.tiny_model import build_tiny_model
    from tests.harness import run_distributed

    tmp = tmp_path_factory.mktemp("resume")
    model = build_tiny_model(tmp / "model")
    record = run_config(tmp / "record", model, steps=6, trainer={"record_rollouts": True},
                        checkpoint={"save_interval": 0})
    assert run_distributed(_train, 1, args=(record,), timeout=300)[0][0] == 6
    replay = {"replay_dir": str(tmp / "record" / "run" / "rollouts")}
    out = {"model": model, "replay": replay, "tmp": tmp}
    for key, name, steps in (("A", "A", 6), ("B3", "B", 3), ("B", "B", 6)):
        cfg = run_config(tmp / name, model, steps=steps, trainer=replay)
        out[key] = run_distributed(_train, 1, args=(cfg,), timeout=300)[0]
    step3 = tmp / "B" / "run" / "checkpoints" / "step_000003"
    for name, layout in (("D", {"tp": 2}), ("P", {"pp": 2})):
        cfg = run_config(tmp / name, model, steps=6, trainer=replay, parallel=layout,
                         checkpoint={"resume": str(step3)})
        out[name] = run_distributed(_train, 2, args=(cfg,), timeout=300)[0]
    return out


def checkpoint_tensors(step_dir: Path, scratch: Path) -> dict:
    """Every tensor (model and optimizer) of a checkpoint, and its common (non-tensor) state."""
    import torch
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    target = scratch / f"{step_dir.parent.parent.parent.name}.pt"
    dcp_to_torch_save(step_dir / "dist", target)
    tensors = torch.load(target, weights_only=False)
    common = torch.load(step_dir / "dist" / "common.pt", weights_only=False)
    return {"tensors": tensors, "common": common,
            "trainer": torch.load(step_dir / "trainer.pt", weights_only=False)}


def assert_close(a, b, where: str, tol: float = 1e-6) -> None:
    import torch

    if isinstance(a, torch.Tensor):
        assert a.shape == b.shape, where
        if a.numel():
            diff = (a.double() - b.double()).abs().max().item()
            assert diff <= tol * max(1.0, a.double().abs().max().item()), (where, diff)
    elif isinstance(a, dict):
        assert set(a) == set(b), (where, set(a) ^ set(b))
        for key in a:
            assert_close(a[key], b[key], f"{where}.{key}", tol)
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_close(x, y, f"{where}[{i}]", tol)
    elif isinstance(a, float):
        assert math.isclose(a, b, rel_tol=tol, abs_tol=tol) or (math.isnan(a) and math.isnan(b)), \
            (where, a, b)
    else:
        assert a == b, (where, a, b)


def step_metrics(run_dir: Path) -> dict[int, dict]:
    from megarl.metrics import read_metrics

    records = read_metrics(run_dir)
    steps = [r["step"] for r in records]
    assert steps == sorted(set(steps)), steps
    return {r["step"]: {k: v for k, v in r.items() if not k.startswith(_IGNORED)}
            for r in records}


@pytest.mark.parametrize("resumed", ["B", "D", "P"], ids=["same-layout", "tp2", "pp2"])
def test_resumed_run_ends_where_the_uninterrupted_one_does(runs, resumed, tmp_path):
    assert runs["A"][0] == 6 and runs["B3"][0] == 3 and runs[resumed][0] == 6
    tmp = runs["tmp"]
    final = {n: checkpoint_tensors(tmp / n / "run" / "checkpoints" / "step_000006", tmp_path)
             for n in ("A", resumed)}
    reference, other = final["A"], final[resumed]
    assert any(k.startswith("optimizer.state.exp_avg.") for k in reference["tensors"])
    assert_close(reference["tensors"], other["tensors"], "dist")
    assert_close(reference["common"], other["common"], "common")
    for part in ("scheduler", "objective", "actor", "monitor"):
        assert_close(reference["trainer"][part], other["trainer"][part], part)
    assert reference["trainer"]["objective"], "the intervention has no state to compare"
    metrics, resumed_metrics = step_metrics(tmp / "A" / "run"), step_metrics(tmp / resumed / "run")
    assert list(metrics) == list(resumed_metrics) == [1, 2, 3, 4, 5, 6]
    if resumed != "B":
        # The entropy-law fit regresses reward on exp(entropy) over a handful of steps whose
        # entropies differ in the 4th decimal: another layout's summation order (1e-9
        # relative) comes out of that ill-conditioned fit near 1e-5. Everything it is fitted on, and
        # every other figure, is held to 1e-6.
        for step in metrics:
            law = {k: metrics[step].pop(k) for k in list(metrics[step]) if "entropy_law/" in k}
            other = {k: resumed_metrics[step].pop(k) for k in law}
            assert_close(law, other, f"metrics.{step}", tol=1e-4)
    assert_close(metrics, resumed_metrics, "metrics")
    assert metrics[6]["optim/grad_norm"] > 0   # it trained: the comparison is not vacuous


def test_a_resume_at_another_layout_warns_that_rng_starts_fresh(runs):
    for name in ("D", "P"):
        warnings = runs[name][1]
        assert any("random generators start fresh" in w and "TP=1 PP=1" in w
                   for w in warnings), warnings
    assert runs["B"][1] == []   # the same layout resumes without a warning


def copy_checkpoint(runs, name: str) -> Path:
    """B's step-3 checkpoint as the latest of a new run directory; returns that directory."""
    root = runs["tmp"] / name
    target = root / "run" / "checkpoints"
    shutil.copytree(runs["tmp"] / "B" / "run" / "checkpoints" / "step_000003",
                    target / "step_000003")
    (target / "latest").write_text("step_000003\n")
    return root


def test_truncated_or_damaged_checkpoint_files_are_errors_naming_the_file(runs):
    from tests.harness import run_distributed

    root = copy_checkpoint(runs, "damaged")
    step3 = root / "run" / "checkpoints" / "step_000003"
    shard = next((step3 / "dist").glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:1000])
    cfg = run_config(root, runs["model"], steps=6, trainer=runs["replay"])
    message = run_distributed(_train, 1, args=(cfg,), timeout=120)[0]
    assert message.startswith("CheckpointError") and str(shard) in message
    assert "truncated" in message and "checkpoint.resume=<path>" in message
    shutil.copy(runs["tmp"] / "B" / "run" / "checkpoints" / "step_000003" / "dist" / shard.name,
                shard)
    trainer_pt = step3 / "trainer.pt"
    trainer_pt.write_bytes(b"\0" * trainer_pt.stat().st_size)   # same size, garbage
    message = run_distributed(_train, 1, args=(cfg,), timeout=120)[0]
    assert message.startswith("CheckpointError") and str(trainer_pt) in message
    assert not (root / "run" / "metrics.jsonl").exists()   # no silent fresh start


def test_a_crash_before_the_rename_keeps_the_previous_checkpoint(runs):
    from tests.harness import run_distributed

    root = copy_checkpoint(runs, "crash")
    checkpoints = root / "run" / "checkpoints"
    cfg = run_config(root, runs["model"], steps=4, trainer=runs["replay"],
                     checkpoint={"save_interval": 1})
    assert run_distributed(_train_crashing_before_rename, 1, args=(cfg, 4), timeout=120) == \
        ["crashed"]
    assert (checkpoints / "latest").read_text().strip() == "step_000003"
    assert (checkpoints / "step_000004.partial" / "COMPLETE").is_file()
    assert not (checkpoints / "step_000004").exists()
    assert run_distributed(_train, 1, args=(cfg,), timeout=120)[0][0] == 4
    assert (checkpoints / "latest").read_text().strip() == "step_000004"
    assert not list(checkpoints.glob("*.partial"))
    metrics = step_metrics(root / "run")
    assert list(metrics) == [1, 2, 3, 4]
    assert_close(step_metrics(runs["tmp"] / "A" / "run")[4], metrics[4], "step 4")
