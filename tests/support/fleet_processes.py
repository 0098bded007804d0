"""Helpers that start real Fleet processes for integration tests, exactly as a user would."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import redis

from workers.process.health import probe

REPO_ROOT = Path(__file__).resolve().parents[2]


def fleet_executable() -> list[str]:
    """The installed ``fleet`` console script next to this interpreter (what a user types)."""
    script = Path(sys.executable).with_name("fleet")
    return [str(script)] if script.exists() else [sys.executable, "-m", "workers.commands.cli"]


class WorkerProcess:
    """``fleet worker ...`` as a child process with its log captured to a file."""

    def __init__(self, redis_url: str, *args: str, name: str, env: dict[str, str] | None = None):
        self.redis_url = redis_url
        self.name = name
        self.log_path = Path(tempfile.mkstemp(prefix=f"{name}-", suffix=".log")[1])
        self._log = self.log_path.open("w")
        full_env = {**os.environ, "REDIS_URL": redis_url, "FLEET_LOG_LEVEL": "INFO", "HF_HUB_OFFLINE": "1",
                    "FLEET_TORCH_THREADS": "1", **(env or {})}
        self.process = subprocess.Popen([*fleet_executable(), "worker", "--name", name, *args], env=full_env,
                                        stdout=self._log, stderr=subprocess.STDOUT, cwd=REPO_ROOT)

    def log(self) -> str:
        return self.log_path.read_text()

    def wait_ready(self, timeout_s: float = 180.0) -> "WorkerProcess":
        client = redis.Redis.from_url(self.redis_url)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"worker {self.name} exited with {self.process.returncode}:\n{self.log()[-4000:]}")
            if probe(client, worker=self.name)[0]:
                return self
            time.sleep(0.1)
        raise RuntimeError(f"worker {self.name} not ready in {timeout_s} s:\n{self.log()[-4000:]}")

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 60.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()
        return self.process.returncode


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


def run_fleet(arguments: list[str], redis_url: str, timeout_s: float = 120.0, **env: str) -> subprocess.CompletedProcess:
    """Run ``fleet ARGUMENTS`` to its end with ``REDIS_URL`` (and ``env``) set; output captured as text."""
    return subprocess.run([*fleet_executable(), *arguments], env={**os.environ, "REDIS_URL": redis_url, **env},
                          capture_output=True, text=True, timeout=timeout_s, cwd=REPO_ROOT)
