"""Process logging setup for Fleet commands."""

from __future__ import annotations

import logging
import sys


def configure_logging(level: str) -> None:
    """Log to stderr at ``level`` with timestamps; idempotent."""
    root = logging.getLogger()
    if getattr(root, "_fleet_configured", False):
        root.setLevel(level.upper())
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root.addHandler(handler)
    root.setLevel(level.upper())
    root._fleet_configured = True  # type: ignore[attr-defined]
