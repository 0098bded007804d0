"""Process logging setup for Fleet commands: JSON lines carrying the trace, or plain text.

``FLEET_LOG_FORMAT`` picks the format: ``json`` (one object per line with ``trace_id`` and
``span_id`` of the current span; see docs/OBSERVABILITY.md), ``text``, or ``auto`` (the
default: text on a terminal, JSON otherwise, i.e. in containers and under supervisors).
The level comes from ``FLEET_LOG_LEVEL`` through the worker settings.
"""

from __future__ import annotations

import logging
import os
import sys

from producer.telemetry import JsonFormatter

LOG_FORMAT_ENV = "FLEET_LOG_FORMAT"
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def resolve_format(fmt: str | None = None, stream=None) -> str:
    """``json`` or ``text`` from ``fmt``, else ``$FLEET_LOG_FORMAT``, else by whether ``stream`` is a TTY."""
    choice = (fmt or os.environ.get(LOG_FORMAT_ENV) or "auto").strip().lower()
    if choice in ("json", "text"):
        return choice
    stream = stream or sys.stderr
    return "text" if getattr(stream, "isatty", lambda: False)() else "json"


def make_formatter(fmt: str) -> logging.Formatter:
    return JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT)


def configure_logging(level: str, fmt: str | None = None) -> None:
    """Log to stderr at ``level`` in ``fmt`` (see ``resolve_format``); idempotent."""
    root = logging.getLogger()
    if getattr(root, "_fleet_configured", False):
        root.setLevel(level.upper())
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(make_formatter(resolve_format(fmt, sys.stderr)))
    root.addHandler(handler)
    root.setLevel(level.upper())
    root._fleet_configured = True  # type: ignore[attr-defined]
