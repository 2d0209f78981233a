"""Every module of megarl.rollout and megarl.sync imports on a CPU-only machine without sglang,
and the packages' lazy exports resolve."""

from __future__ import annotations

import importlib
import pkgutil
import sys

import pytest

import megarl.rollout
import megarl.sync

MODULES = [f"{pkg.__name__}.{m.name}" for pkg in (megarl.rollout, megarl.sync)
           for m in pkgutil.iter_modules(pkg.__path__)]


@pytest.mark.parametrize("name", MODULES)
def test_module_imports_without_sglang(name):
    importlib.import_module(name)
    assert "sglang" not in sys.modules  # sglang is a GPU extra, imported only when used


@pytest.mark.parametrize("package", [megarl.rollout, megarl.sync])
def test_lazy_exports_resolve(package):
    for name in package.__all__:
        assert getattr(package, name) is not None
    with pytest.raises(AttributeError):
        getattr(package, "no_such_name")
