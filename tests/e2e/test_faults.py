"""Faults during training, end to end on CPU.

* One run (`faulty_run`) against two dev servers behind sglang-router, in which a server is
  SIGKILLed while it generates, one prompt's reward function never returns, and the dataset
  holds malformed rows. The step completes on the other server; the dead server is taken out
  of the router, restarted, sent the current weights (verified) and only then serves again;
  the hanging rewards time out; the bad rows are counted in the first step's metrics.
* NaN rewards (replayed batches, no servers) make steps skip, counted; too many in a row stop
  the run with a message, and the last checkpoint stays intact.
* SIGTERM to the trainer ranks of a `torchrun` job in the middle of a step: exit code 0, a
  checkpoint at the step that was running, and a resumed run continues from it.

This module imports little at the top: the reward workers import it to find
`stuck_on_hang`, and a worker replaced after a time-out must start fast.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

HANG = "hang"


def stuck_on_hang(response: str, answer: str) -> float:
    """A reward function that never returns for the answer "hang" (else a length-based score)."""
    if answer == HANG:
        time.sleep(3600)
    return (len(response) % 3) / 2.0


def write_faulty_prompts(path: Path) -> Path:
    """Valid rows with one "hang" answer among the first four (data.shuffle is off, so step 1
    draws them), and four malformed rows: undecodable, cut off, missing key, wrong type."""
    valid = [{"prompt": f"{i}+{i}=", "answer": HANG if i == 1 else str(2 * i)} for i in range(12)]
    with open(path, "wb") as f:
        for i, row in enumerate(valid):
            f.write((json.dumps(row) + "\n").encode())
            if i == 2:
                f.write(b"\xff\xfe not utf-8\n")
                f.write(b'{"prompt": "cut off", "answ\n')
                f.write(b'{"prompt": "no answer"}\n')
                f.write(b'{"prompt": 7, "answer": "7"}\n')
    return path


def _train(cfg):
    from megarl.trainer.loop import train

    return train(cfg)


def dev_servers(marker: str) -> dict[int, int]:
    """{port: pid} of the dev servers whose command line mentions `marker` (the test's dir)."""
    import psutil

    found = {}
    for proc in psutil.process_iter(["pid", "cmdline"]):
        cmd = proc.info["cmdline"] or []
        if "megarl.rollout.dev_server" in cmd and any(marker in part for part in cmd):
            found[int(cmd[cmd.index("--port") + 1])] = proc.info["pid"]
    return found


class ServerKiller(threading.Thread):
    """SIGKILLs the first of the run's two dev servers seen generating, then watches its
    restarted self: `served` collects (weight_version, requests finished) once it has served."""

    def __init__(self, marker: str) -> None:
        super().__init__(daemon=True)
        self.marker = marker
        self.url = None
        self.served: list[tuple[str, int]] = []
        self.done = threading.Event()

    @staticmethod
    def info(url: str):
        from megarl.rollout.servers import http_get

        try:
            return json.loads(http_get(url + "/server_info", timeout_s=2)[1])
        except (OSError, ValueError):
            return None

    def run(self) -> None:
        while not self.done.is_set() and self.url is None:
            for port, pid in dev_servers(self.marker).items():
                info = self.info(f"http://127.0.0.1:{port}")
                if info and info["num_requests_running"] > 0:
                    os.killpg(pid, signal.SIGKILL)
                    self.url = f"http://127.0.0.1:{port}"
                    break
            time.sleep(0.005)
        while not self.done.is_set():
            info = self.info(self.url)
            if info and info["num_requests_finished"] > 0:
                self.served.append((info["weight_version"], info["num_requests_finished"]))
            time.sleep(0.05)


def faulty_config(tmp_path: Path):
    from megarl.config import from_dict
    from tests.fixtures.tiny_model import build_tiny_model

    return from_dict({
        "model": {"hf_dir": str(build_tiny_model(tmp_path / "model")), "dtype": "float32",
                  "make_vocab_size_divisible_by": 16},
        "optimizer": {"lr": 1e-3},
        "rollout": {"backend": "dev", "num_servers": 2, "use_router": True, "base_port": 0,
                    "router_port": 0, "router_policy": "round_robin", "prompts_per_step": 4,
                    "samples_per_prompt": 4, "max_new_tokens": 24, "health_timeout_s": 120,
                    "retry_backoff_s": 0.1, "server_args": {"num_threads": 1}},
        "sync": {"verify": True, "bucket_mb": 0.01},
        "reward": {"function": "tests.e2e.test_faults:stuck_on_hang", "timeout_s": 1.0,
                   "num_workers": 2},
        "algorithm": {"micro_batch_tokens": 128},
        "data": {"train_files": [str(write_faulty_prompts(tmp_path / "prompts.jsonl"))],
                 "shuffle": False, "max_prompt_tokens": 64},
        "checkpoint": {"save_interval": 0},
        "logging": {"output_dir": str(tmp_path / "run"), "tensorboard": False, "progress": "off"},
        "trainer": {"num_steps": 3, "seed": 5, "record_rollouts": True},
    })


def our_processes(marker: str) -> list:
    import psutil

    return [p for p in psutil.process_iter(["cmdline"])
            if any(marker in part for part in (p.info["cmdline"] or []))]


@pytest.fixture(scope="module")
def faulty_run(tmp_path_factory):
    from tests.harness import run_distributed

    tmp = tmp_path_factory.mktemp("faulty")
    cfg = faulty_config(tmp)
    killer = ServerKiller(str(tmp))
    killer.start()
    try:
        result = run_distributed(_train, 1, args=(cfg,), timeout=300)
    finally:
        killer.done.set()
        killer.join(5)
    assert not our_processes(str(tmp)), "servers or the router outlived the run"
    records = [json.loads(line) for line in (tmp / "run" / "metrics.jsonl").read_text().split("\n")
               if line]
    return {"result": result, "killer": killer, "metrics": {r["step"]: r for r in records},
            "run": tmp / "run"}


def test_a_server_killed_mid_rollout_is_restarted_and_resynced(faulty_run):
    assert faulty_run["result"] == [3]
    killer, metrics = faulty_run["killer"], faulty_run["metrics"]
    assert killer.url, "the server was never busy: the test did not exercise a failure"
    assert metrics[1]["servers/num_restarts"] == 1
    assert metrics[3]["servers/num_in_rotation"] == 2
    for step in (1, 2, 3):   # every step completed and trained
        assert metrics[step]["rollout/num_responses"] == 16
        assert metrics[step]["optim/step_applied"] == 1.0
    # Every response of step k came from weights of version k - 1: no server, restarted or
    # not, served before it held the current weights.
    for step in (1, 2, 3):
        recorded = json.loads((faulty_run["run"] / "rollouts" / f"step_{step:06d}.json")
                              .read_text())["batch"]
        assert set(recorded["weight_versions"]) == {str(step - 1)}, step
    # The restarted server served again (in the rollouts of steps 2 and 3), with synced weights.
    versions = {version for version, _ in killer.served}
    assert versions & {"1", "2"}, f"the restarted server never served a request: {versions}"
    assert versions <= {"1", "2", "3"}


def test_a_reward_that_never_returns_times_out(faulty_run):
    metrics = faulty_run["metrics"]
    assert metrics[1]["rollout/num_reward_timeouts"] == 4   # the four samples of "hang"
    assert metrics[2]["rollout/num_reward_timeouts"] == 0
    assert all(math.isfinite(metrics[s]["loss/total"]) for s in (1, 2, 3))


def test_the_final_checkpoint_holds_the_data_cursor(faulty_run):
    import torch

    state = torch.load(faulty_run["run"] / "checkpoints" / "step_000003" / "trainer.pt",
                       weights_only=False)
    assert state["sampler"]["epoch"] == 0 and state["sampler"]["position"] == 12   # 3 x 4


def test_malformed_rows_are_counted_in_the_first_step(faulty_run):
    first = faulty_run["metrics"][1]
    assert first["data/num_malformed_rows"] == 4
    assert first["data/num_rows"] == 16
    assert "data/num_malformed_rows" not in faulty_run["metrics"][2]


def write_rollouts(directory: Path, num_steps: int, *, nan_steps=()) -> Path:
    """Recorded rollout batches as `trainer.record_rollouts` writes them, made up: 4 groups of
    4 responses of random tokens, rewards that differ within each group (NaN in `nan_steps`)."""
    import random

    from megarl.rollout.batch import RolloutBatch
    from megarl.trainer.experience import record

    rng = random.Random(0)
    for step in range(1, num_steps + 1):
        batch = RolloutBatch()
        for group in range(4):
            prompt = [rng.randrange(10, 120) for _ in range(8)]
            for k in range(4):
                response = [rng.randrange(10, 120) for _ in range(rng.randint(3, 8))]
                reward = math.nan if step in nan_steps else float(k % 2)
                batch.prompt_token_ids.append(prompt)
                batch.response_token_ids.append(response)
                batch.rollout_logprobs.append([-4.0] * len(response))
                batch.rewards.append(reward)
                batch.task_rewards.append(reward)
                batch.group_ids.append(group)
                batch.loss_mask.append(True)
                batch.truncated.append(False)
                batch.finish_reasons.append("stop")
                batch.answers.append("0")
                batch.weight_versions.append(str(step - 1))
        record(batch, directory, step)
    return directory


def replay_config(tmp_path: Path, rollouts: Path, *, steps: int, tp: int = 1, **sections):
    from megarl.config import from_dict
    from tests.fixtures.tiny_model import build_tiny_model

    base = {
        "model": {"hf_dir": str(build_tiny_model(tmp_path / "model")), "dtype": "float32",
                  "make_vocab_size_divisible_by": 16},
        "parallel": {"tp": tp},
        "optimizer": {"lr": 1e-3},
        "algorithm": {"micro_batch_tokens": 64},
        "checkpoint": {"save_interval": 1},
        "logging": {"output_dir": str(tmp_path / "run"), "tensorboard": False, "progress": "off"},
        "trainer": {"num_steps": steps, "seed": 5, "replay_dir": str(rollouts)},
    }
    for section, values in sections.items():
        base.setdefault(section, {}).update(values)
    return from_dict(base)


def _train_until_error(cfg):
    from megarl.trainer.loop import train

    try:
        return train(cfg)
    except RuntimeError as exc:
        return f"{type(exc).__name__}: {exc}"


def read_steps(run_dir: Path) -> dict[int, dict]:
    from megarl.metrics import read_metrics

    return {r["step"]: r for r in read_metrics(run_dir)} if (run_dir / "metrics.jsonl").exists() \
        else {}


def test_nonfinite_steps_are_skipped_counted_and_too_many_stop_the_run(tmp_path):
    from tests.harness import run_distributed

    rollouts = write_rollouts(tmp_path / "rollouts", 5, nan_steps={2, 4, 5})
    cfg = replay_config(tmp_path, rollouts, steps=5, trainer={"max_nonfinite_steps": 2})
    message = run_distributed(_train_until_error, 1, args=(cfg,), timeout=120)[0]
    assert message.startswith("RuntimeError: 2 optimizer steps in a row had a NaN/inf loss")
    assert "trainer.max_nonfinite_steps = 2" in message
    metrics = read_steps(tmp_path / "run")
    applied = {s: metrics[s]["optim/step_applied"] for s in metrics}
    assert applied == {1: 1.0, 2: 0.0, 3: 1.0, 4: 0.0, 5: 0.0}   # the stopping step is logged
    assert [metrics[s]["trainer/skipped_steps"] for s in metrics] == [0, 1, 1, 2, 3]
    checkpoints = tmp_path / "run" / "checkpoints"
    assert (checkpoints / "latest").read_text().strip() == "step_000004"   # intact, not 5


def _train(cfg):
    from megarl.trainer.loop import train

    return train(cfg)


def wait_for_step(run_dir: Path, step: int, proc: subprocess.Popen, timeout: float) -> int:
    """The last logged step once it is at least `step`; fails if the job ends first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"the job ended early with code {proc.returncode}"
        steps = read_steps(run_dir)
        if steps and max(steps) >= step:
            return max(steps)
        time.sleep(0.05)
    raise TimeoutError(f"step {step} was not logged within {timeout} s")


def test_sigterm_under_torchrun_finishes_the_step_checkpoints_exits_0_and_resumes(tmp_path):
    import psutil

    from megarl.config import to_yaml
    from tests.harness import run_distributed

    repo = Path(__file__).resolve().parents[2]
    cfg = replay_config(tmp_path, write_rollouts(tmp_path / "rollouts", 60), steps=60, tp=2,
                        checkpoint={"save_interval": 0})
    (tmp_path / "config.yaml").write_text(to_yaml(cfg))
    env = dict(os.environ, PYTHONPATH=str(repo))
    with open(tmp_path / "torchrun.log", "wb") as log:
        job = subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
             "2", "-m", "megarl.cli", "train", "--config", str(tmp_path / "config.yaml")],
            cwd=repo, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        seen = wait_for_step(tmp_path / "run", 2, job, timeout=240)
        ranks = [p for p in psutil.Process(job.pid).children(recursive=True)
                 if "megarl.cli" in p.cmdline()]
        assert len(ranks) == 2
        for _ in range(2):   # Slurm signals every task and torchrun forwards it: twice
            for rank in ranks:
                try:
                    rank.send_signal(signal.SIGTERM)
                except psutil.NoSuchProcess:
                    pass
            time.sleep(0.2)
        code = job.wait(120)
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
            job.wait()
    assert code == 0, (tmp_path / "torchrun.log").read_text()[-3000:]
    latest = (tmp_path / "run" / "checkpoints" / "latest").read_text().strip()
    stopped = int(latest.removeprefix("step_"))
    assert seen <= stopped <= seen + 2 and stopped < 60
    assert max(read_steps(tmp_path / "run")) == stopped   # the step that was running finished
    cfg.trainer.num_steps = stopped + 2
    assert run_distributed(_train, 2, args=(cfg,), timeout=120) == [stopped + 2] * 2
    assert list(read_steps(tmp_path / "run")) == list(range(1, stopped + 3))
    assert not our_processes(str(tmp_path))
