"""The conversion command lines as a user runs them from a shell: HF -> Megatron, verify at
TP=1 x PP=2 (the command starts its own processes), Megatron -> HF. (Exit codes of bad input
and of a failed verification are covered in tests/unit/test_convert_errors.py.)"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from megarl.models.tiny import save_random_hf_checkpoint, tiny_config

ROOT = Path(__file__).resolve().parents[2]


def _run(*argv: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, *argv], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=240)


def test_convert_verify_and_back(tmp_path):
    config = tiny_config("qwen2", tie_word_embeddings=True, num_hidden_layers=2)
    save_random_hf_checkpoint(config, tmp_path / "hf", seed=4)
    megatron = tmp_path / "megatron"

    done = _run("tools/convert_hf_to_megatron.py", "--hf-dir", str(tmp_path / "hf"),
                "--output-dir", str(megatron), "--tp", "2", "--progress", "off")
    assert done.returncode == 0, done.stderr
    assert (megatron / "megarl_checkpoint.json").is_file()

    verify = _run("-m", "megarl.cli", "verify-conversion", "--hf-dir", str(tmp_path / "hf"),
                  "--megatron-dir", str(megatron), "--pp", "2", "--atol", "1e-4",
                  "--min-top1", "1.0")
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert "top-1 agreement: 100.00%" in verify.stdout and "OK" in verify.stdout

    back = _run("tools/convert_megatron_to_hf.py", "--megatron-dir", str(megatron),
                "--output-dir", str(tmp_path / "back"), "--hf-config-dir", str(tmp_path / "hf"),
                "--progress", "off")
    assert back.returncode == 0, back.stderr
    original = load_file(tmp_path / "hf" / "model.safetensors")
    converted = load_file(tmp_path / "back" / "model.safetensors")
    assert sorted(converted) == sorted(original)
    assert all(torch.equal(converted[k], v) for k, v in original.items())
