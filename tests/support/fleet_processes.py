"""Helpers that start real Fleet processes for integration tests, exactly as a user would.

Starting a worker and waiting until it is ready is ``workers/process/launch.py`` (shared with
``fleet demo`` and the benchmarks); this module adds the tests' defaults.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

from workers.process.launch import LaunchedWorker
from workers.process.launch import fleet_command as fleet_executable

__all__ = ["REPO_ROOT", "WorkerProcess", "fleet_executable", "redis_server_available", "run_fleet", "wait_for"]

REPO_ROOT = Path(__file__).resolve().parents[2]
#: What every test worker runs with: INFO logs (tests read them), no hub, one torch thread (two shared
#: cores), and the repository root importable (test-only models: ``impl = "tests.support...."``; the
#: ``fleet`` console script does not put the working directory on ``sys.path``).
TEST_WORKER_ENV = {"FLEET_LOG_LEVEL": "INFO", "HF_HUB_OFFLINE": "1", "FLEET_TORCH_THREADS": "1",
                   "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}


class WorkerProcess(LaunchedWorker):
    """``fleet worker ...`` as a child process of a test, started from the repository root."""

    def __init__(self, redis_url: str, *args: str, name: str, env: dict[str, str] | None = None):
        super().__init__(redis_url, *args, name=name, env={**TEST_WORKER_ENV, **(env or {})}, cwd=REPO_ROOT)


def wait_for(condition, timeout_s: float, what: str):
    """Poll ``condition()`` every 0.2 s; return its first truthy value, or fail after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def redis_server_available() -> bool:
    return shutil.which("redis-server") is not None


def run_fleet(arguments: list[str], redis_url: str, timeout_s: float = 120.0,
              **env: str) -> subprocess.CompletedProcess[str]:
    """Run ``fleet ARGUMENTS`` to its end with ``REDIS_URL`` (and ``env``) set; output captured as text."""
    return subprocess.run([*fleet_executable(), *arguments], env={**os.environ, "REDIS_URL": redis_url, **env},
                          capture_output=True, text=True, timeout=timeout_s, cwd=REPO_ROOT)
