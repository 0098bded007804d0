"""Which code a benchmark measured: the commit, for the reports' headers and docs/BENCHMARKS.md."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def commit() -> str | None:
    """``FLEET_BENCH_COMMIT`` if set (the lent GPU machine runs a copy of the working tree whose
    git metadata need not match it: bench/gpu/run.sh is given the commit), else ``git rev-parse
    --short HEAD``; None when neither says."""
    given = os.environ.get("FLEET_BENCH_COMMIT", "").strip()
    if given:
        return given
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None
