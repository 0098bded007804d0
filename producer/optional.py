"""Optional dependencies: imported only where they are used, or refused naming the extra to install.

The plain install (``pip install fleet-mlq``) is the producer alone; the rest comes in extras
(``pyproject.toml``): ``otel``, ``cli``, ``worker``, ``training``, ``dashboard``, ``demo``, ``dev``.
Code that needs one of them calls ``require_extra`` at the point of use:

    require_extra("rich", extra="cli", purpose="fleet status")
    from rich.table import Table

A missing module then raises ``MissingExtraError`` (an ``ImportError``) whose message is the one
command that fixes it.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from types import ModuleType

from producer.errors import FleetError
from producer.version import DISTRIBUTION


class MissingExtraError(FleetError, ImportError):
    """An optional dependency is not installed; ``extra`` names the extra that installs it."""

    def __init__(self, module: str, extra: str, purpose: str):
        super().__init__(f"{purpose} needs the Python package {module.partition('.')[0]!r}, which is not installed: "
                         f"pip install '{DISTRIBUTION}[{extra}]'")
        self.module, self.extra, self.purpose = module, extra, purpose


def require_installed(module: str, *, extra: str, purpose: str) -> None:
    """Raise ``MissingExtraError`` (naming ``extra``) unless ``module`` is installed; import nothing.

    For processes that only start the ones that import it: ``fleet worker``'s launcher checks
    that torch is there without loading it (about 300 MB and a second of start-up).
    """
    try:
        found = importlib.util.find_spec(module) is not None
    except ImportError:  # a parent package is missing
        found = False
    except ValueError:  # a module whose spec is None, e.g. one that set itself up in sys.modules
        found = module in sys.modules
    if not found:
        raise MissingExtraError(module, extra, purpose)


def require_extra(module: str, *, extra: str, purpose: str) -> ModuleType:
    """Import ``module`` and return it; raise ``MissingExtraError`` (naming ``extra``) if it is missing.

    ``purpose`` says what needs it, as the user would name it ("fleet status", "the digits data set").
    """
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingExtraError(module, extra, purpose) from exc
