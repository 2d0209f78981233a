"""Colocated training on one GPU (skipped without CUDA or sglang): the trainer (TP=1) and one
SGLang server share GPU 0. Each step the actor offloads its optimizer state and gradient
buffers while the server generates, the server releases its memory while the actor trains,
and the new weights reach it as CUDA IPC handles; sync.verify checks them after every sync."""

from __future__ import annotations

import math

import pytest
import torch

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
    pytest.mark.timeout(900),
]
pytest.importorskip("sglang")

from tests.e2e.test_train import _read_metrics, _train, demo_like_config  # noqa: E402
from tests.fixtures.tiny_model import build_model, build_tokenizer  # noqa: E402
from tests.harness import run_distributed  # noqa: E402


def test_two_colocated_steps_on_one_gpu(tmp_path):
    # SGLang's attention kernels want head_dim 64: the tiny model at width 256.
    wide = tmp_path / "wide_model"
    build_model(0, dtype=torch.bfloat16, num_layers=2, hidden=256).save_pretrained(wide)
    build_tokenizer().save_pretrained(wide)
    cfg = demo_like_config(
        tmp_path, tp=1, steps=2, port=32400,
        model={"dtype": "bfloat16", "hf_dir": str(wide)},
        rollout={"backend": "sglang", "mode": "colocated", "use_router": False,
                 "mem_fraction_static": 0.3,
                 "server_args": {"enable_memory_saver": True, "skip_server_warmup": True,
                                 "disable_cuda_graph": True}},
        sync={"transport": "colocated", "verify": True},
    )
    assert run_distributed(_train, 1, args=(cfg,), timeout=900) == [2]
    records = [r for r in _read_metrics(tmp_path / "run") if "loss/total" in r]
    assert [r["step"] for r in records] == [1, 2]
    assert all(math.isfinite(r["loss/total"]) and r["optim/step_applied"] == 1.0
               for r in records)
