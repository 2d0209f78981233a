"""Every megarl module imports on a machine without CUDA, transformer-engine, sglang, apex or
flash-attn, and importing has no side effects (the CPU mode is only switched on by apply())."""

from __future__ import annotations

import subprocess
import sys
import textwrap

_SCRIPT = textwrap.dedent("""
    import importlib, importlib.abc, pkgutil, sys, warnings
    warnings.filterwarnings("ignore")

    BLOCKED = ("transformer_engine", "sglang", "apex", "flash_attn", "wandb")

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name.split(".")[0] in BLOCKED and not name.startswith("sglang_router"):
                raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)")
            return None

    sys.meta_path.insert(0, Block())
    import torch
    torch.cuda.is_available = lambda: False

    import megarl
    names = sorted(m.name for m in pkgutil.walk_packages(megarl.__path__, "megarl."))
    failures = []
    for name in names:
        try:
            importlib.import_module(name)
        except Exception as exc:  # noqa: BLE001
            failures.append(f"{name}: {type(exc).__name__}: {exc}")
    from megarl import platform
    assert not platform.is_applied(), "importing megarl switched the CPU mode on"
    print(len(names), "modules")
    print("\\n".join(failures))
    sys.exit(1 if failures else 0)
""")


def test_every_module_imports_without_gpu_packages():
    proc = subprocess.run([sys.executable, "-c", _SCRIPT], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    assert int(proc.stdout.split()[0]) >= 10


def test_config_and_cli_stay_light():
    """`megarl --help` and config loading must not pay for importing megatron-core."""
    code = ("import sys, megarl.cli, megarl.config; "
            "megarl.cli.build_parser(); "
            "print(any(m.startswith('megatron') for m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "False", out.stderr
