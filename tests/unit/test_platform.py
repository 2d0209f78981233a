"""The CPU mode for megatron-core: scoped to megatron, idempotent, version-guarded, and every
redirected call still works. Each check runs in a fresh interpreter so that what apply()
changes cannot leak between tests."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

from megarl import platform

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU mode is CPU-only")


def _run(code: str) -> str:
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout


def test_patches_reach_megatron_but_not_the_rest_of_the_process():
    out = _run("""
        import sys, torch, warnings
        warnings.filterwarnings("ignore")
        from megarl import platform
        assert platform.apply() is True and platform.apply() is True   # idempotent
        assert platform.is_applied()
        # megatron modules see the CPU stand-in ...
        import megatron.core.tensor_parallel.layers as layers
        assert layers.torch.cuda.current_device() == torch.device("cpu")
        assert layers.torch.zeros(2, device="cuda").device.type == "cpu"
        assert layers.torch.empty(2, device=0, pin_memory=True).device.type == "cpu"
        layers.torch.cuda.synchronize()
        # ... including modules imported after apply() (the import hook)
        assert "megatron.core.datasets.data_schedule" not in sys.modules
        import megatron.core.datasets.data_schedule as late
        assert late.torch is not torch and late.torch.cuda.current_device().type == "cpu"
        # ... while the rest of the process keeps the real torch
        assert torch.cuda.current_device is not layers.torch.cuda.current_device
        assert torch.zeros(1).type() == "torch.FloatTensor"
        try:
            torch.zeros(1, device="cuda")
        except (AssertionError, RuntimeError):
            print("real torch untouched")
    """)
    assert "real torch untouched" in out


def test_scoped_type_checks_only_inside_the_wrapped_functions():
    _run("""
        import torch, warnings
        warnings.filterwarnings("ignore")
        from megarl import platform
        platform.apply()
        from megatron.core.optimizer import clip_grads
        p = torch.nn.Parameter(torch.ones(3)); p.grad = torch.full((3,), 2.0)
        clip_grads.clip_grad_by_total_norm_fp32([p], max_norm=1.0, total_norm=4.0)
        assert torch.allclose(p.grad, torch.full((3,), 0.5), atol=1e-5)
        assert torch.zeros(1).type() == "torch.FloatTensor"      # restored afterwards
        assert torch.Tensor.cuda is platform._real_tensor_cuda
    """)


def test_rng_tracker_forks_the_cpu_generator():
    _run("""
        import os, torch, warnings, torch.distributed as dist
        warnings.filterwarnings("ignore")
        from megarl import platform
        platform.apply()
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29555")
        dist.init_process_group("gloo", rank=0, world_size=1)
        from megatron.core import parallel_state as ps
        from megatron.core.tensor_parallel import random
        ps.initialize_model_parallel(1, 1)
        random.model_parallel_cuda_manual_seed(5)
        tracker = random.get_cuda_rng_tracker()
        outside_state = torch.get_rng_state()
        with tracker.fork():
            a = torch.rand(4)
        assert torch.equal(torch.get_rng_state(), outside_state)   # outer stream restored
        with tracker.fork():
            b = torch.rand(4)
        assert not torch.equal(a, b)                               # the forked stream advanced
        random.model_parallel_cuda_manual_seed(5)
        with random.get_cuda_rng_tracker().fork():
            assert torch.equal(torch.rand(4), a)                   # reproducible from the seed
    """)


def test_version_guard(monkeypatch):
    monkeypatch.setattr(platform, "megatron_version", lambda: "0.17.0")
    with pytest.raises(RuntimeError, match="written for 0.16.x, but megatron-core 0.17.0"):
        platform.check_megatron_version()
    monkeypatch.setattr(platform, "megatron_version", lambda: "0.16.9")
    platform.check_megatron_version()


def test_never_active_when_cuda_is_present():
    _run("""
        import torch
        torch.cuda.is_available = lambda: True
        from megarl import platform
        assert platform.apply() is False and not platform.is_applied()
        assert platform.dist_backend() == "nccl"
    """)


def test_missing_patch_target_is_a_loud_error():
    out = _run("""
        import warnings; warnings.filterwarnings("ignore")
        from megarl import platform
        platform._SCOPED_FUNCTIONS = platform._SCOPED_FUNCTIONS + (
            ("megatron.core.optimizer.clip_grads", "no_such_function"),)
        try:
            platform.apply()
        except RuntimeError as e:
            print(e)
    """)
    assert "no_such_function" in out and "update megarl/platform.py" in out


def test_cpu_queries():
    assert platform.device() == torch.device("cpu")
    assert platform.dist_backend() == "gloo"


def test_ddp_config_never_defers_the_parameter_gather(monkeypatch):
    """The weight export reads parameters right after the optimizer step (on GPU too)."""
    from megarl.config import ModelConfig, OptimizerConfig
    from megarl.models import megatron_config

    monkeypatch.setattr(platform, "has_cuda", lambda: True)
    ddp = megatron_config.ddp_config(OptimizerConfig(use_distributed_optimizer=True),
                                     ModelConfig(hf_dir="x"))
    assert ddp.use_distributed_optimizer and ddp.overlap_grad_reduce
    assert not ddp.overlap_param_gather
