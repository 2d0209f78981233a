"""The one place that knows CUDA from CPU.

On a GPU machine megatron-core runs unmodified and this module only answers questions
(`device()`, `dist_backend()`). Without CUDA, `apply()` redirects the CUDA-only calls that
megatron-core makes so that the same model, schedules and optimizer run on CPU over gloo:

* ``torch.cuda.current_device()`` allocations, ``device="cuda"`` literals and ``pin_memory``
  inside megatron-core modules are sent to the CPU. This is done by giving every
  ``megatron.core`` module a stand-in for its global name ``torch`` (``_CpuTorch``) rather than
  by touching the real ``torch``: code outside megatron-core sees no change.
* ``torch.cuda.synchronize`` and stream/event calls inside megatron-core become no-ops.
* The CUDA RNG tracker (``tensor_parallel/random.py``) keeps its named states on the CPU
  generator, so ``get_cuda_rng_tracker().fork()`` keeps working.
* ``param.type() == 'torch.cuda.FloatTensor'`` checks in the optimizers and gradient clipping,
  and ``tensor.cuda()`` in the tied-embedding set-up, see CPU tensors as their CUDA twins while
  those functions run.

It is written for, and refuses anything but, the megatron-core minor version in
``SUPPORTED_MEGATRON``; tests under ``tests/unit/test_platform.py`` and the distributed
equivalence tests fail loudly when an upgrade breaks it.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.abc
import importlib.util
import sys
import threading
import types
from typing import Any, Callable, Iterator

import torch

SUPPORTED_MEGATRON = "0.16"

# Modules imported by apply() so that everything the actor uses gets the stand-in up front;
# anything megatron-core imports later is patched by the import hook.
_MEGATRON_MODULES = (
    "megatron.core.parallel_state",
    "megatron.core.utils",
    "megatron.core.tensor_parallel",
    "megatron.core.tensor_parallel.random",
    "megatron.core.pipeline_parallel.schedules",
    "megatron.core.pipeline_parallel.p2p_communication",
    "megatron.core.distributed",
    "megatron.core.optimizer",
    "megatron.core.optimizer.optimizer",
    "megatron.core.optimizer.distrib_optimizer",
    "megatron.core.optimizer.clip_grads",
    "megatron.core.models.gpt.gpt_model",
    "megatron.core.models.common.language_module.language_module",
    "megatron.core.transformer.transformer_block",
)

_applied = False
_lock = threading.Lock()


def has_cuda() -> bool:
    """True when a CUDA device can be used."""
    return torch.cuda.is_available()


def has_transformer_engine() -> bool:
    """True when transformer-engine can be imported (it is only installed on GPU machines)."""
    return importlib.util.find_spec("transformer_engine") is not None


def device() -> torch.device:
    """The device this process computes on: its current CUDA device, or the CPU."""
    if has_cuda():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def dist_backend() -> str:
    """The torch.distributed backend for trainer process groups."""
    return "nccl" if has_cuda() else "gloo"


def is_applied() -> bool:
    """Whether the CPU mode is active in this process."""
    return _applied


# --------------------------------------------------------------------------------------------
# The stand-in for `torch` inside megatron-core modules.


def _cpu_device(dev: Any) -> Any:
    """Map any CUDA device designation to the CPU; leave everything else alone."""
    if dev is None:
        return None
    if isinstance(dev, int) and not isinstance(dev, bool):
        return torch.device("cpu")
    if isinstance(dev, str) and dev.startswith("cuda"):
        return torch.device("cpu")
    if isinstance(dev, torch.device) and dev.type == "cuda":
        return torch.device("cpu")
    return dev


def _on_cpu(factory: Callable) -> Callable:
    @functools.wraps(factory)
    def wrapper(*args, **kwargs):
        if "device" in kwargs:
            kwargs["device"] = _cpu_device(kwargs["device"])
        if kwargs.get("pin_memory"):
            kwargs["pin_memory"] = False
        return factory(*args, **kwargs)

    return wrapper


_FACTORIES = (
    "empty", "zeros", "ones", "full", "tensor", "as_tensor", "arange", "rand", "randn",
    "randint", "randperm", "empty_strided", "zeros_like", "ones_like", "empty_like", "full_like",
    "linspace",
)


class _NoopStream:
    """Stands in for CUDA streams and events: every method does nothing."""

    def __init__(self, *args, **kwargs):
        pass

    def __getattr__(self, name):
        return lambda *args, **kwargs: None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class _CpuCuda(types.ModuleType):
    """`torch.cuda` as megatron-core sees it in CPU mode."""

    def __init__(self) -> None:
        super().__init__("torch.cuda")
        self.current_device = lambda: torch.device("cpu")
        self.synchronize = lambda *args, **kwargs: None
        self.Stream = _NoopStream
        self.Event = _NoopStream
        self.current_stream = lambda *args, **kwargs: _NoopStream()
        self.stream = lambda *args, **kwargs: contextlib.nullcontext()
        self.empty_cache = lambda: None
        self.memory_allocated = lambda *args, **kwargs: 0
        self.max_memory_allocated = lambda *args, **kwargs: 0
        self.memory_reserved = lambda *args, **kwargs: 0
        # The RNG tracker's "device" generator is the CPU generator.
        self.get_rng_state = lambda device=None: torch.get_rng_state()
        self.set_rng_state = lambda state, device=None: torch.set_rng_state(state)
        self.manual_seed = lambda seed: torch.manual_seed(seed)
        self.manual_seed_all = lambda seed: torch.manual_seed(seed)
        self.random = types.SimpleNamespace(
            get_rng_state=self.get_rng_state, set_rng_state=self.set_rng_state
        )

    def __getattr__(self, name: str) -> Any:
        return getattr(torch.cuda, name)


class _CpuTorch(types.ModuleType):
    """`torch` as megatron-core sees it in CPU mode: real torch with CUDA sent to the CPU."""

    def __init__(self) -> None:
        super().__init__("torch")
        self.cuda = _CpuCuda()
        for name in _FACTORIES:
            setattr(self, name, _on_cpu(getattr(torch, name)))

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)


_CPU_TORCH: _CpuTorch | None = None


def _patch_module(module: types.ModuleType) -> None:
    if module.__dict__.get("torch") is torch:
        module.torch = _CPU_TORCH


class _MegatronImportHook(importlib.abc.MetaPathFinder):
    """Gives megatron-core modules imported after apply() the stand-in too."""

    def find_spec(self, fullname, path, target=None):
        if not fullname.startswith("megatron.core"):
            return None
        for finder in sys.meta_path:
            if finder is self:
                continue
            spec = finder.find_spec(fullname, path, target) if hasattr(finder, "find_spec") else None
            if spec is not None and spec.loader is not None:
                spec.loader = _PatchingLoader(spec.loader)
                return spec
        return None


class _PatchingLoader(importlib.abc.Loader):
    def __init__(self, loader):
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        _patch_module(module)

    def __getattr__(self, name):
        return getattr(self._loader, name)


# --------------------------------------------------------------------------------------------
# Scoped patches for checks that a module stand-in cannot reach (methods on tensors).

_CUDA_TYPE_NAMES = {
    "torch.FloatTensor": "torch.cuda.FloatTensor",
    "torch.HalfTensor": "torch.cuda.HalfTensor",
    "torch.BFloat16Tensor": "torch.cuda.BFloat16Tensor",
}
_scope_depth = 0
_real_tensor_type = torch.Tensor.type
_real_tensor_cuda = torch.Tensor.cuda


def _type_as_cuda(self, dtype=None, non_blocking=False, **kwargs):
    if dtype is None:
        name = _real_tensor_type(self)
        return _CUDA_TYPE_NAMES.get(name, name)
    return _real_tensor_type(self, dtype, non_blocking, **kwargs)


def _cuda_as_identity(self, device=None, non_blocking=False, memory_format=torch.preserve_format):
    return self


@contextlib.contextmanager
def _cpu_tensors_look_like_cuda() -> Iterator[None]:
    global _scope_depth
    with _lock:
        _scope_depth += 1
        if _scope_depth == 1:
            torch.Tensor.type = _type_as_cuda
            torch.Tensor.cuda = _cuda_as_identity
    try:
        yield
    finally:
        with _lock:
            _scope_depth -= 1
            if _scope_depth == 0:
                torch.Tensor.type = _real_tensor_type
                torch.Tensor.cuda = _real_tensor_cuda


def _scoped(fn: Callable) -> Callable:
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with _cpu_tensors_look_like_cuda():
            return fn(*args, **kwargs)

    wrapper.__megarl_cpu_scoped__ = True
    return wrapper


def _replace_function(module_name: str, qualname: str) -> None:
    """Wrap `module.qualname` in the CUDA-look scope, also where it was imported by name."""
    module = importlib.import_module(module_name)
    owner: Any = module
    *path, attr = qualname.split(".")
    try:
        for part in path:
            owner = getattr(owner, part)
        raw = vars(owner)[attr] if isinstance(owner, type) else getattr(owner, attr)
    except (AttributeError, KeyError):
        raise RuntimeError(
            f"megarl's CPU mode patches {module_name}.{qualname}, which this megatron-core "
            f"({megatron_version()}) no longer has; update megarl/platform.py"
        ) from None
    kind = type(raw) if isinstance(raw, (staticmethod, classmethod)) else None
    original = raw.__func__ if kind else raw
    if getattr(original, "__megarl_cpu_scoped__", False):
        return
    wrapped = _scoped(original)
    setattr(owner, attr, kind(wrapped) if kind else wrapped)
    if not path:  # module-level function: rebind it where other modules imported it by name
        for name, other in list(sys.modules.items()):
            if name.startswith("megatron.core") and other is not None:
                for key, value in list(vars(other).items()):
                    if value is original:
                        setattr(other, key, wrapped)


_SCOPED_FUNCTIONS = (
    ("megatron.core.optimizer.optimizer", "Float16OptimizerWithFloat16Params.__init__"),
    ("megatron.core.optimizer.distrib_optimizer", "DistributedOptimizer._build_model_and_main_param_groups"),
    ("megatron.core.optimizer.clip_grads", "clip_grad_by_total_norm_fp32"),
    # Checkpointing the distributed optimizer in its reshardable format moves shards with .cuda().
    ("megatron.core.optimizer.distrib_optimizer", "DistributedOptimizer.get_parameter_state_dp_zero"),
    ("megatron.core.models.common.language_module.language_module",
     "LanguageModule.setup_embeddings_and_output_layer"),
)


# --------------------------------------------------------------------------------------------
# The CUDA RNG tracker on the CPU generator.


def _cpu_get_rng_state(device="cuda", clone=False, graph_safe=False):
    return torch.get_rng_state()


def _cpu_set_rng_state(new_state, device=-1, graph_safe=False):
    torch.set_rng_state(new_state)


def _patch_rng_tracker() -> None:
    random = importlib.import_module("megatron.core.tensor_parallel.random")
    for name in ("_get_cuda_rng_state", "_set_cuda_rng_state"):
        if not hasattr(random, name):
            raise RuntimeError(
                f"megarl's CPU mode replaces megatron.core.tensor_parallel.random.{name}, which "
                f"this megatron-core ({megatron_version()}) no longer has; update megarl/platform.py"
            )
    random._get_cuda_rng_state = _cpu_get_rng_state
    random._set_cuda_rng_state = _cpu_set_rng_state


# --------------------------------------------------------------------------------------------


def megatron_version() -> str:
    from megatron.core import package_info

    return package_info.__version__


def check_megatron_version() -> None:
    """Raise if the installed megatron-core is not the minor version the CPU mode was written for."""
    version = megatron_version()
    if ".".join(version.split(".")[:2]) != SUPPORTED_MEGATRON:
        raise RuntimeError(
            f"megarl's CPU mode for megatron-core was written for {SUPPORTED_MEGATRON}.x, but "
            f"megatron-core {version} is installed; install megatron-core=={SUPPORTED_MEGATRON}.* "
            "or update megarl/platform.py and run tests/unit/test_platform.py"
        )


def apply(force: bool = False) -> bool:
    """Enable the CPU mode for megatron-core when CUDA is absent.

    Idempotent. Returns True when the CPU mode is active after the call. Does nothing on a
    machine with CUDA (unless `force`, which only tests use to exercise the patches).
    """
    global _applied, _CPU_TORCH
    if _applied:
        return True
    if has_cuda() and not force:
        return False
    check_megatron_version()
    _CPU_TORCH = _CpuTorch()
    for name in _MEGATRON_MODULES:
        importlib.import_module(name)
    for name, module in list(sys.modules.items()):
        if name.startswith("megatron.core") and module is not None:
            _patch_module(module)
    sys.meta_path.insert(0, _MegatronImportHook())
    _patch_rng_tracker()
    for module_name, qualname in _SCOPED_FUNCTIONS:
        _replace_function(module_name, qualname)
    _applied = True
    return True
