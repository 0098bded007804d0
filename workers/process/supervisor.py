"""``fleet up``: one worker process per device, supervised.

Each worker is a separate ``fleet worker`` process (fork + exec: nothing CUDA-initialised is
ever forked), pinned with ``CUDA_VISIBLE_DEVICES`` so it sees exactly one GPU. A worker that
dies is restarted with exponential backoff; SIGINT/SIGTERM stops them all (each drains).
Other children (``--flower``: the Flower dashboard, see ``workers.commands.flower``) are supervised the
same way. The supervisor itself never imports torch.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

from workers.process.parent_watch import die_with_parent

log = logging.getLogger("fleet.up")

BACKOFF_START_S = 1.0
BACKOFF_MAX_S = 30.0
#: A worker that stayed up this long has its backoff reset.
STABLE_AFTER_S = 60.0


class PlanError(ValueError):
    """``--devices`` names devices that do not exist or is malformed."""


@dataclass(frozen=True)
class WorkerPlan:
    """One worker to run: its node name, ``--device`` argument and pinning environment."""

    name: str
    device: str
    env: dict[str, str]


def visible_gpus(environ: Mapping[str, str] | None = None) -> list[str]:
    """GPU ids this process may use, without initialising CUDA.

    ``CUDA_VISIBLE_DEVICES`` wins when set; else ``nvidia-smi -L`` is asked; no GPU -> [].
    """
    environ = os.environ if environ is None else environ
    if "CUDA_VISIBLE_DEVICES" in environ:
        return [part.strip() for part in environ["CUDA_VISIBLE_DEVICES"].split(",") if part.strip()]
    if not shutil.which("nvidia-smi"):
        return []
    try:
        listing = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [match.group(1) for match in re.finditer(r"^GPU (\d+):", listing, re.M)]


def plan_workers(devices: str, gpus: list[str], hostname: str) -> list[WorkerPlan]:
    """Turn ``--devices`` into worker plans.

    ``all``: one worker per GPU in ``gpus``; ``0,1``: those GPU ids (each must be in ``gpus``);
    ``cpu`` or ``cpu:N``: N CPU workers (default 1), with GPUs hidden.
    """
    spec = devices.strip().lower()
    if spec == "cpu" or spec.startswith("cpu:"):
        count_text = spec.partition(":")[2] or "1"
        if not count_text.isdigit() or int(count_text) < 1:
            raise PlanError(f"--devices {devices!r}: expected cpu or cpu:N with N >= 1")
        return [WorkerPlan(f"fleet-cpu{i}@{hostname}", "cpu", {"CUDA_VISIBLE_DEVICES": ""})
                for i in range(int(count_text))]
    if spec == "all":
        if not gpus:
            raise PlanError("--devices all: no GPU is visible (use --devices cpu)")
        chosen = list(gpus)
    else:
        chosen = [part.strip() for part in spec.split(",") if part.strip()]
        unknown = [gpu for gpu in chosen if gpu not in gpus]
        if not chosen or unknown:
            raise PlanError(f"--devices {devices!r}: GPUs {unknown or chosen} not visible (visible: {gpus or 'none'})")
        if len(set(chosen)) != len(chosen):
            raise PlanError(f"--devices {devices!r} names a GPU twice")
    return [WorkerPlan(f"fleet-gpu{gpu}@{hostname}", "cuda:0", {"CUDA_VISIBLE_DEVICES": gpu}) for gpu in chosen]


@dataclass
class Supervised:
    """A running (or waiting-to-restart) child process and its restart bookkeeping.

    ``name`` is what the logs call it; ``env`` is laid over this process's environment.
    """

    name: str
    command: list[str]
    env: dict[str, str] = field(default_factory=dict)
    process: subprocess.Popen | None = None
    started_at: float = 0.0
    restarts: int = 0
    backoff_s: float = BACKOFF_START_S
    restart_at: float | None = None

    @classmethod
    def worker(cls, plan: WorkerPlan, models: str, registry: str | None, train: bool,
               consumers: int | None = None, serve_trained: bool = False) -> Supervised:
        """The ``fleet worker`` child for ``plan``, with its pinning environment."""
        return cls(plan.name, worker_command(plan, models, registry, train, consumers, serve_trained), plan.env)

    def start(self) -> None:
        # The child dies with the supervisor (a SIGKILLed `fleet up` leaves no worker behind); the
        # supervisor is single-threaded, so preexec_fn is safe here.
        self.process = subprocess.Popen(self.command, env={**os.environ, **self.env}, preexec_fn=die_with_parent)
        self.started_at = time.monotonic()
        self.restart_at = None
        log.info("started %s (pid %d)", self.name, self.process.pid)


class Supervisor:
    """Runs the planned workers (plus optional extra processes such as Flower) until stopped."""

    def __init__(self, children: list[Supervised], drain_grace_s: float):
        self.children = children
        self.drain_grace_s = drain_grace_s
        self._stopping = False

    def _request_stop(self, signum: int, _frame: object) -> None:
        log.info("received %s: stopping all children", signal.Signals(signum).name)
        self._stopping = True

    def run(self, poll_s: float = 0.5) -> int:
        signal.signal(signal.SIGTERM, self._request_stop)
        signal.signal(signal.SIGINT, self._request_stop)
        for child in self.children:
            child.start()
        while not self._stopping:
            now = time.monotonic()
            for child in self.children:
                self._check(child, now)
            time.sleep(poll_s)
        return self._stop_all()

    def _check(self, child: Supervised, now: float) -> None:
        if child.restart_at is not None:
            if now >= child.restart_at:
                child.restarts += 1
                child.start()
            return
        assert child.process is not None, "started above"
        code = child.process.poll()
        if code is None:
            if now - child.started_at > STABLE_AFTER_S:
                child.backoff_s = BACKOFF_START_S
            return
        child.restart_at = now + child.backoff_s
        log.warning("%s exited with code %s; restarting in %.0f s", child.name, code, child.backoff_s)
        child.backoff_s = min(child.backoff_s * 2, BACKOFF_MAX_S)

    def _stop_all(self) -> int:
        running = [c.process for c in self.children if c.process is not None and c.process.poll() is None]
        for process in running:
            process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.drain_grace_s + 15
        for process in running:
            try:
                process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.error("pid %d did not drain in time; killing it", process.pid)
                process.kill()
                process.wait()
        log.info("all children stopped")
        return 0


def worker_command(plan: WorkerPlan, models: str, registry: str | None, train: bool,
                   consumers: int | None = None, serve_trained: bool = False) -> list[str]:
    """The ``fleet worker`` command line for ``plan`` (``consumers`` None: the worker's own default)."""
    command = [sys.executable, "-m", "workers.commands.cli", "worker", "--device", plan.device, "--name", plan.name]
    if consumers:
        command += ["--consumers", str(consumers)]
    if models:
        command += ["--models", models]
    if registry:
        command += ["--registry", registry]
    if train:
        command.append("--train")
    if serve_trained:
        command.append("--serve-trained")
    return command
