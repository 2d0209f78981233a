"""The example launchers as a user runs them with bash: DRY_RUN=1 checks the config and prints
the layout and memory without GPUs; a broken config stops them with the config error; and
without DRY_RUN they convert and launch the right commands (recorded by stand-ins for
python's GPU entry points, srun and scontrol, so nothing real starts)."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
LAUNCHERS = {
    "qwen2.5-math-7b_grpo_siren_1node.sh": (
        "4 trainer GPUs = TP 2 x PP 1 x CP 1 x DP 2", "4 SGLang server(s) x TP 1"),
    "qwen2.5-32b_dapo_klcov_4nodes.sh": (
        "16 trainer GPUs = TP 8 x PP 1 x CP 1 x DP 2", "8 SGLang server(s) x TP 2"),
    "qwen3-32b_aer_slurm.sh": (
        "32 trainer GPUs = TP 8 x PP 1 x CP 1 x DP 4", "8 SGLang server(s) x TP 2"),
}
_LAUNCH_VARS = ("SLURM_", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT", "ROLLOUT_ADDRS", "DRY_RUN",
                "CONFIG", "HF_DIR", "MEGATRON_DIR", "RANK", "WORLD_SIZE", "LOCAL_RANK")

# Stands in for python: records the commands that would start GPU work, runs the rest.
_FAKE_PYTHON = """#!/usr/bin/env bash
case "$1 $2" in
  "-m torch.distributed.run"|"-m sglang.launch_server"|"-m sglang_router.launch_router")
    echo "python $*" >> "$RECORD"; exit 0;;
esac
case "$1" in *convert_hf_to_megatron.py) echo "python $*" >> "$RECORD"; exit 0;; esac
exec {python} "$@"
"""
# Stands in for srun: records the step; runs `bash` steps (the server start-up) here, with the
# environment srun would export to the node. The trainer step returns at once, so it first
# waits for EXPECT_SERVERS recorded servers (the launcher stops the server steps when it ends).
_FAKE_SRUN = """#!/usr/bin/env bash
echo "srun MASTER_ADDR=${MASTER_ADDR:-} $*" >> "$RECORD"
if [[ "$*" == *"megarl.cli train"* ]]; then
  for _ in $(seq 600); do
    (( $(grep -c launch_server "$RECORD") >= ${EXPECT_SERVERS:-0} )) && break; sleep 0.1
  done
fi
while [[ "$1" == --* ]]; do shift; done
if [[ "$1" == bash ]]; then exec "$@"; fi
"""
_FAKE_SCONTROL = """#!/usr/bin/env bash
printf 'n%d\\n' 0 1 2 3 4 5
"""


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(_LAUNCH_VARS)}
    env.update(PYTHON=sys.executable, HF_DIR=str(tmp_path / "model"),
               DATA=str(tmp_path / "prompts.parquet"), OUT=str(tmp_path / "out"))
    env.update(extra)
    return env


def _launch(name: str, env: dict[str, str], *overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(EXAMPLES / name), *overrides], env=env,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("name", sorted(LAUNCHERS))
def test_dry_run_prints_layout_and_memory_and_starts_nothing(name, tmp_path):
    done = _launch(name, _env(tmp_path, DRY_RUN="1"))
    assert done.returncode == 0, done.stdout + done.stderr
    layout, servers = LAUNCHERS[name]
    out = done.stdout
    assert "DRY_RUN=1" in out and f"layout:  {layout}" in out
    assert "memory per trainer GPU" in out and "optimizer state" in out and "activations" in out
    assert "fits" in next(line for line in out.splitlines() if line.strip().startswith("total"))
    assert servers in out and "KV cache" in out
    assert sorted(p.name for p in tmp_path.iterdir()) == [], "a dry run wrote something"


@pytest.mark.parametrize("name", sorted(LAUNCHERS))
def test_a_broken_config_stops_the_launcher(name, tmp_path):
    config = (EXAMPLES / name.replace(".sh", ".yaml")).read_text()
    broken = tmp_path / "broken.yaml"
    broken.write_text(config.replace("  server_tp:", "  server_tpp:"))
    done = _launch(name, _env(tmp_path, DRY_RUN="1", CONFIG=str(broken)))
    assert done.returncode == 2
    assert f"rollout.server_tpp: {broken}:" in done.stderr and "unknown key" in done.stderr
    assert "did you mean 'rollout.server_tp'" in done.stderr


def test_a_layout_the_model_refuses_stops_the_dry_run(tmp_path):
    done = _launch("qwen2.5-math-7b_grpo_siren_1node.sh",
                   _env(tmp_path, DRY_RUN="1", TRAIN_GPUS="8"), "parallel.tp=8")
    assert done.returncode == 2
    assert "parallel.tp: 8 does not divide the 28 attention heads" in done.stderr


@pytest.fixture
def recorded(tmp_path):
    """An environment whose python, srun and scontrol record GPU launches in a file."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("python", _FAKE_PYTHON.format(python=shlex.quote(sys.executable))),
                       ("srun", _FAKE_SRUN), ("scontrol", _FAKE_SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    record = tmp_path / "record.txt"
    env = _env(tmp_path, PYTHON=str(bin_dir / "python"), RECORD=str(record),
               PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return env, lambda: record.read_text().splitlines()


def test_one_node_launcher_converts_then_runs_torchrun(recorded, tmp_path):
    env, lines = recorded
    done = _launch("qwen2.5-math-7b_grpo_siren_1node.sh", env, "trainer.num_steps=3")
    assert done.returncode == 0, done.stderr
    convert, train = lines()
    assert f"--hf-dir {tmp_path}/model --output-dir {tmp_path}/model_megatron --tp 2 --pp 1" \
        in convert
    assert "-m torch.distributed.run --standalone --nproc-per-node 4 -m megarl.cli train" in train
    assert f"data.train_files=[{tmp_path}/prompts.parquet] " in train
    assert train.endswith("trainer.num_steps=3")


def test_multi_node_torchrun_launcher_trains_or_serves_by_node_rank(recorded, tmp_path):
    env, lines = recorded
    env.update(MASTER_ADDR="h0", ROLLOUT_ADDRS="r0 r1")
    done = _launch("qwen2.5-32b_dapo_klcov_4nodes.sh", {**env, "NODE_RANK": "0"})
    assert done.returncode == 0, done.stderr
    convert, train = lines()
    assert "--tp 8 --pp 1" in convert
    assert ("--nnodes 2 --node-rank 0 --nproc-per-node 8 --master-addr h0 --master-port 29500"
            in train)
    urls = ",".join(f"http://r{n}:{30000 + i}" for n in range(2) for i in range(4))
    assert f"rollout.server_urls=[{urls}]" in train

    done = _launch("qwen2.5-32b_dapo_klcov_4nodes.sh", {**env, "NODE_RANK": "3"})
    assert done.returncode == 0, done.stderr
    servers = [line for line in lines()[2:] if "sglang.launch_server" in line]
    gpus = sorted(s.split("--base-gpu-id ")[1].split()[0] for s in servers)  # started at once
    assert gpus == ["0", "2", "4", "6"]
    assert all(f"--model-path {tmp_path}/model --host 0.0.0.0" in s for s in servers)

    env.pop("ROLLOUT_ADDRS")
    done = _launch("qwen2.5-32b_dapo_klcov_4nodes.sh", {**env, "NODE_RANK": "0"})
    assert done.returncode == 2 and "set ROLLOUT_ADDRS" in done.stderr


def test_slurm_launcher_places_servers_router_and_trainer(recorded, tmp_path):
    env, lines = recorded
    env.update(SLURM_JOB_ID="1", SLURM_JOB_NODELIST="n[0-5]", EXPECT_SERVERS="8")
    done = _launch("qwen3-32b_aer_slurm.sh", env)
    assert done.returncode == 0, done.stderr
    steps = [line for line in lines() if line.startswith("srun")]
    servers = [s for s in steps if "start_sglang_servers" in s]
    assert sorted(s.split("--nodelist=")[1].split()[0] for s in servers) == ["n0", "n1"]
    started = [line for line in lines() if "sglang.launch_server" in line and "--tp-size 2" in line]
    assert len(started) == 8  # 4 per rollout node, each sourcing common.sh as srun runs it
    router = next(s for s in steps if "sglang_router.launch_router" in s)
    assert "--nodelist=n0 --overlap" in router and "http://n1:30003" in router
    train = next(s for s in steps if "megarl.cli train" in s)
    assert train.startswith("srun MASTER_ADDR=n2 --nodes=4 --ntasks-per-node=8 "
                            "--nodelist=n2,n3,n4,n5")
    assert "rollout.router_url=http://n0:30999" in train
