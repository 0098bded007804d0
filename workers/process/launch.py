"""Start ``fleet worker`` as a child process and wait until it is ready: the one way ``fleet demo``,
the tests (``tests/support/fleet_processes.py``) and the benchmarks (``bench/``) do it.

    worker = LaunchedWorker(redis_url, "--device", "cpu", "--models", "minilm", name="w1")
    worker.wait_ready()          # its heartbeat says ready; raises with the log's tail if it exits first
    ...
    worker.stop()                # SIGTERM (a graceful drain), SIGKILL after the timeout

The worker is started exactly as a user would start it: the ``fleet`` console script next to
this interpreter, else ``python -m workers.commands.cli``. Its stdout and stderr go to a log file.
Nothing here imports torch or Celery.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import redis

from producer.redis_connection import redis_client
from producer.settings import FleetSettings
from workers.process.health import probe

#: How long a worker may take to load its models and start consuming (s); a busy CPU is slow.
READY_TIMEOUT_S = 180.0
#: How often readiness is polled (s).
POLL_S = 0.1


def fleet_command() -> list[str]:
    """The ``fleet`` console script installed next to this interpreter, else ``python -m workers.commands.cli``."""
    script = Path(sys.executable).with_name("fleet")
    return [str(script)] if script.exists() else [sys.executable, "-m", "workers.commands.cli"]


class LaunchedWorker:
    """A ``fleet worker --name NAME ARGS`` child process with its output in ``log_path``.

    ``env`` is laid over this process's environment (``REDIS_URL`` is set to ``redis_url``);
    ``log_path`` defaults to a new temporary file; ``command`` replaces ``fleet worker`` (for a
    wrapper that runs the same worker, e.g. ``bench/fleet_worker.py``).
    """

    def __init__(self, redis_url: str, *args: str, name: str, env: dict[str, str] | None = None,
                 log_path: Path | None = None, cwd: Path | None = None, command: Sequence[str] | None = None):
        self.redis_url = redis_url
        self.name = name
        self.log_path = log_path or Path(tempfile.mkstemp(prefix=f"{name}-", suffix=".log")[1])
        self._log = self.log_path.open("w")
        self.environment = {**os.environ, **(env or {}), "REDIS_URL": redis_url}
        launch = list(command) if command is not None else [*fleet_command(), "worker"]
        self.process = subprocess.Popen([*launch, "--name", name, *args], env=self.environment,
                                        stdout=self._log, stderr=subprocess.STDOUT, cwd=cwd)

    def redis_settings(self) -> FleetSettings:
        """How this worker reaches Redis: its ``REDIS_URL`` and, for Sentinel, its ``FLEET_SENTINEL_MASTER``."""
        master = self.environment.get("FLEET_SENTINEL_MASTER")
        if master:
            return FleetSettings(redis_url=self.redis_url, sentinel_master=master)
        return FleetSettings(redis_url=self.redis_url)

    @property
    def pid(self) -> int:
        return self.process.pid

    def log(self) -> str:
        """Everything the worker wrote so far."""
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.process.poll() is None

    def is_ready(self, client: redis.Redis) -> bool:
        """Whether its heartbeat says ready; raise ``RuntimeError`` (with the log's tail) if it exited."""
        if self.process.poll() is not None:
            raise RuntimeError(f"worker {self.name} exited with {self.process.returncode}:\n{self.log()[-4000:]}")
        return probe(client, worker=self.name)[0]

    def wait_ready(self, timeout_s: float = READY_TIMEOUT_S) -> LaunchedWorker:
        """Block until the worker is ready (see ``wait_all_ready``); return self."""
        wait_all_ready([self], timeout_s)
        return self

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 60.0) -> int | None:
        """Send ``sig`` (default SIGTERM: drain), SIGKILL after ``timeout_s``; return the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()
        return self.process.returncode


def wait_all_ready(workers: Sequence[LaunchedWorker], timeout_s: float = READY_TIMEOUT_S) -> None:
    """Block until every worker's heartbeat says ready (the workers share one Redis).

    Raises ``RuntimeError`` with the log's tail as soon as one exits, or naming those not ready
    after ``timeout_s`` seconds. A Redis error while polling (a Redis that restarts) is retried
    until the deadline.
    """
    if not workers:
        return
    client = redis_client(workers[0].redis_settings(), patient=False, socket_timeout=5)
    deadline = time.monotonic() + timeout_s
    pending = list(workers)
    last_error: redis.RedisError | None = None
    try:
        while pending and time.monotonic() < deadline:
            for worker in list(pending):
                try:
                    if worker.is_ready(client):
                        pending.remove(worker)
                except redis.RedisError as exc:
                    last_error = exc
            if pending:
                time.sleep(POLL_S)
    finally:
        client.close()
    if pending:
        logs = "\n".join(f"--- {worker.name} ({worker.log_path}):\n{worker.log()[-2000:]}" for worker in pending)
        raise RuntimeError(f"workers not ready in {timeout_s:.0f} s: {[w.name for w in pending]}"
                           f" (last Redis error: {last_error})\n{logs}")
