"""The fleet a chaos run breaks: a private redis-server with the append-only file on, and real
``fleet worker`` processes (``workers/process/launch.py``) that it SIGKILLs and restarts.

A kill hits one of three targets (``kill_targets``, taken in turn, kill after kill):

* ``worker``: the whole group (its launcher; the device process and consumers die with it, as in
  a pod kill); a replacement worker starts at once;
* ``consumer``: one consumer process of a worker group, found in its heartbeat; the group's
  launcher starts it again;
* ``device``: a group's device process; the group stops (exit 75) as ``fleet up`` or Kubernetes
  would see it, and a replacement worker starts at once, as they would start one.

Workers serve ``minilm`` and the demo models (``topics``, ``tiny-llama``); each logs to
``<workdir>/<name>.log`` (``chaos-w1.log``, ...), which the checks read afterwards. Every event
is printed with the seconds since the fleet was made.
"""

from __future__ import annotations

import os
import random
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import redis

from workers.process.embedded_redis import RedisServer
from workers.process.health import read_heartbeats
from workers.process.launch import LaunchedWorker, wait_all_ready

REPO_ROOT = Path(__file__).resolve().parents[2]
MODELS = "minilm,topics,tiny-llama"
#: How long workers may take to load the three models on a busy machine (s).
READY_TIMEOUT_S = 300.0


@dataclass
class Fleet:
    """The Redis server and worker processes under test."""

    workdir: Path
    registry: Path
    workers: int
    env: dict[str, str]
    redis_signal: str
    redis_args: list[str] = field(default_factory=list)
    #: ``fleet worker --consumers`` for every worker.
    consumers: int = 1
    #: What a kill may hit: ``worker``, ``consumer``, ``device`` (see the module docstring).
    kill_targets: tuple[str, ...] = ("worker",)
    #: Kills done per target.
    kills_by_target: dict[str, int] = field(default_factory=dict)
    redis: RedisServer | None = None
    processes: dict[str, LaunchedWorker] = field(default_factory=dict)
    generation: int = 0
    kills_done: int = 0
    events: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    t0: float = field(default_factory=time.monotonic)

    @property
    def url(self) -> str:
        assert self.redis is not None, "start_redis() first"
        return self.redis.url

    def note(self, text: str) -> None:
        line = f"[{time.monotonic() - self.t0:7.1f} s] {text}"
        self.events.append(line)
        print(line, flush=True)

    def start_redis(self, port: int | None = None) -> None:
        self.redis = RedisServer(port, appendonly=True, directory=self.workdir / "redis",
                                 extra_args=self.redis_args).start()

    def restart_redis(self, index: int) -> None:
        """Stop Redis (SIGTERM or SIGKILL, see ``redis_signal``; ``alternate`` by ``index``) and start it again."""
        assert self.redis is not None and self.redis.process is not None
        sig = {"term": signal.SIGTERM, "kill": signal.SIGKILL}.get(
            self.redis_signal, signal.SIGTERM if index % 2 == 0 else signal.SIGKILL)
        started = time.monotonic()
        self.redis.process.send_signal(sig)
        self.redis.process.wait(60)
        time.sleep(0.5)
        self.start_redis(self.redis.port)
        self.note(f"Redis restarted ({signal.Signals(sig).name}), down {time.monotonic() - started:.1f} s")

    def start_worker(self) -> str:
        """Start the next ``chaos-wN`` worker (not waiting for it); return its name."""
        with self.lock:
            self.generation += 1
            name = f"chaos-w{self.generation}"
        worker = LaunchedWorker(self.url, "--device", "cpu", "--registry", str(self.registry), "--models", MODELS,
                                "--consumers", str(self.consumers),
                                name=name, env=self.env, log_path=self.workdir / f"{name}.log", cwd=REPO_ROOT)
        with self.lock:
            self.processes[name] = worker
        return name

    def kill_random_worker(self, rng: random.Random) -> None:
        """SIGKILL a worker (a ready one if any: it holds jobs) and start a replacement at once."""
        with self.lock:
            alive = sorted(name for name, worker in self.processes.items() if worker.alive())
        if not alive:
            return
        ready = []
        try:
            client = redis.Redis.from_url(self.url, socket_timeout=2, socket_connect_timeout=2)
            ready = [name for name in alive if self.processes[name].is_ready(client)]
            client.close()
        except (redis.RedisError, RuntimeError):  # Redis restarting, or a worker just exited
            pass
        victim = rng.choice(ready or alive)
        target = self.kill_targets[self.kills_done % len(self.kill_targets)]
        pid = self._group_pid(victim, target) if target != "worker" else None
        if target != "worker" and pid is None:
            target = "worker"  # no heartbeat to find the process in (Redis restarting): kill the group
        if pid is None:
            self.processes[victim].stop(signal.SIGKILL, timeout_s=30)
        else:
            os.kill(pid, signal.SIGKILL)
        self.kills_done += 1
        self.kills_by_target[target] = self.kills_by_target.get(target, 0) + 1
        if target == "consumer":
            self.note(f"SIGKILLed a consumer of {victim} (pid {pid}); its launcher starts it again")
            return
        replacement = self.start_worker()
        self.note(f"SIGKILLed {victim if target == 'worker' else f'the device process of {victim} (pid {pid})'}; "
                  f"started {replacement}")

    def _group_pid(self, name: str, target: str) -> int | None:
        """The pid of ``name``'s device process or of one of its consumers, from its heartbeat."""
        try:
            client = redis.Redis.from_url(self.url, socket_timeout=2, socket_connect_timeout=2)
            beat = next((b for b in read_heartbeats(client) if b["name"].split("@")[0] == name), None)
            client.close()
        except redis.RedisError:
            return None
        if beat is None:
            return None
        if target == "device":
            return beat["device_process"]["pid"] or None
        pids = [consumer["pid"] for consumer in beat["consumers"] if consumer["pid"]]
        return random.Random(len(self.events)).choice(pids) if pids else None

    def wait_ready(self, names: list[str]) -> None:
        wait_all_ready([self.processes[name] for name in names], READY_TIMEOUT_S)

    def stop(self) -> None:
        """SIGTERM every worker (they drain side by side), wait, then stop Redis."""
        for worker in self.processes.values():
            if worker.alive():
                worker.process.send_signal(signal.SIGTERM)
        for worker in self.processes.values():
            worker.stop(timeout_s=60)
        if self.redis is not None:
            self.redis.stop(kill=True)
