"""Helpers for tests of scripts that are not importable packages (bench/autoscale_sim.py,
infra/k8s/render.py) and of optional test-only dependencies."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

import pytest


def load_script(name: str, path: Path) -> ModuleType:
    """Import the file ``path`` as the module ``name`` (registered in ``sys.modules``)."""
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None, f"cannot import {path}"
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def require_test_dependency(module: str, install: str) -> None:
    """Fail under CI (``CI`` set), skip elsewhere, when the test-only dependency ``module`` is missing."""
    if importlib.util.find_spec(module) is not None:
        return
    message = f"{module} not installed: {install}"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)
