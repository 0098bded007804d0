"""``fleet worker``: one worker group on one device: a device process and N consumer processes.

The process the user starts is the group's *launcher*. It never imports torch, Celery's
worker or the models. It:

1. pins the device (``CUDA_VISIBLE_DEVICES``) and reads the registry;
2. starts, with multiprocessing's ``spawn`` (nothing is ever forked from a process that
   touched CUDA), the **device process** (workers/serving/device_server.py: torch, the
   resident models, one batcher per model) and ``--consumers`` **consumer processes**
   (workers/process/consumer_main.py: Celery workers, threads pool, no torch) that import
   their code while the models load;
3. once the device reports its models, gives the consumers the group's serving plan (the model
   cards, the queues; workers/serving/serving_plan.py) and writes the group's heartbeat (ready once
   every process is ready), which keeps the models it serves in the catalog with their
   ``last_seen`` time;
4. watches them: a consumer that dies is started again (the jobs it held come back to their
   queues after the visibility timeout); if the device process dies, the consumers' waiting
   jobs are handed back to their queues, the jobs it was computing are charged or marked
   suspect (docs/RELIABILITY.md, "Attempts"), the consumers stop, and the launcher exits with
   ``EXIT_DEVICE_LOST`` so that ``fleet up`` (or Kubernetes) restarts the whole group;
5. on SIGTERM or SIGINT: consumers drain (jobs in flight finish within ``FLEET_DRAIN_GRACE_S``,
   the rest are handed back), then the device process stops, then the launcher exits 0;
6. carries out the model commands consumer 0 passes on (load, unload, switch a model while the
   group serves: workers/process/model_lifecycle.py), and starts with the models its record in
   Redis says it served before a restart (``--reset-models``: exactly ``--models``).

The group's processes share a status board (workers/process/status_board.py) and talk over
a ZeroMQ socket in a private runtime directory.
"""

from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.connection
import os
import shutil
import signal
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis

from producer import keys, redis_connection
from workers.commands.exit_codes import ExitCode
from workers.observability.logs import configure_logging
from workers.process.devices import DeviceError, parse_device, pin_cuda_device
from workers.process.health import Heartbeat
from workers.process.model_lifecycle import MODEL_SLOTS, ModelLifecycle, current_registry, restored_models
from workers.process.status_board import MAX_CONSUMERS, State, StatusBoard
from workers.serving import ipc
from workers.serving.registry import ModelSpec, RegistryError, select
from workers.serving.serving_plan import ServingPlan
from workers.settings import WorkerSettings

log = logging.getLogger("fleet.worker")

EXIT_CONFIG_ERROR = ExitCode.CONFIG
EXIT_LOAD_ERROR = ExitCode.MODEL_LOAD_FAILED
#: The device process died; the group stopped so that its supervisor starts it again.
EXIT_DEVICE_LOST = ExitCode.DEVICE_LOST

#: How often the launcher looks at its processes (s).
WATCH_S = 0.2
#: Seconds a Redis PING may take before the group counts as unready.
REDIS_CHECK_TIMEOUT_S = 1.0
#: The heartbeat waits at most this long for the device's statistics (s).
STATS_TIMEOUT_S = 1.0
#: After the consumers' drain grace, how long the launcher waits for them before killing them (s).
STOP_MARGIN_S = 15.0


@dataclass(frozen=True)
class WorkerOptions:
    """What ``fleet worker`` was asked to do. ``consumers`` None: ``default_consumers``."""

    device: str
    models: list[str]
    name: str | None = None
    train: bool = False
    consumers: int | None = None
    #: Load models that training jobs register with ``serve_on`` a device like this one, when they finish.
    serve_trained: bool = False
    #: Start with exactly ``models``, not with what the group's record says it served before.
    reset_models: bool = False


def default_consumers(device: str, cpus: int, devices_on_host: int = 1) -> int:
    """Consumer processes for one device when ``--consumers`` is not given.

    CPU workers: 1 (the model's own threads need the cores). GPU workers: the CPU cores this
    device's share of the host has, less two (its device process and Redis), halved (leave
    room for producers), between 1 and 8.
    """
    if not device.startswith("cuda"):
        return 1
    share = max(1, cpus // max(1, devices_on_host))
    return max(1, min(8, (share - 2) // 2))


def worker_name(options: WorkerOptions, device: str, hostname: str) -> str:
    """Celery node name ``fleet-<device>@<host>`` unless ``--name`` gave one."""
    if options.name:
        return options.name if "@" in options.name else f"{options.name}@{hostname}"
    tag = device.replace(":", "")
    if device.startswith("cuda") and os.environ.get("CUDA_VISIBLE_DEVICES"):
        tag = f"gpu{os.environ['CUDA_VISIBLE_DEVICES']}"
    return f"fleet-{tag}@{hostname}"


def consumer_node_name(group_name: str, index: int) -> str:
    """Consumer 0 carries the group's name; the others ``<name>-c<i>@<host>``."""
    if index == 0:
        return group_name
    base, _, host = group_name.partition("@")
    return f"{base}-c{index}@{host}" if host else f"{base}-c{index}"


def charge_crash(redis_client: redis.Redis, computing: list[list[str]], ttl_s: int) -> None:
    """After the device process died: charge each job it was computing alone; mark batch-mates suspect."""
    with redis_client.pipeline(transaction=False) as pipe:
        for job_ids in computing:
            for job_id in job_ids:
                key = keys.crash_record(job_id)
                if len(job_ids) == 1:
                    pipe.hincrby(key, "charges", 1)
                else:
                    pipe.hset(key, "suspect", "1")
                pipe.expire(key, ttl_s)
        pipe.execute()


def run_worker(options: WorkerOptions, settings: WorkerSettings | None = None) -> int:
    """Run one worker group until it is shut down; return the process exit code."""
    settings = settings or WorkerSettings()
    configure_logging(settings.log_level)
    stop = _StopRequest()
    redis_client = redis_connection.redis_client(settings)
    try:
        requested = pin_cuda_device(parse_device(options.device))
        name = worker_name(options, requested, settings.hostname)
        registry = current_registry(redis_client, settings)
        select(registry, options.models)  # an unknown --models name stops the worker, record or not
        restored = restored_models(redis_client, name, options.models, registry, options.reset_models)
        specs = select(registry, restored.models)
    except (DeviceError, RegistryError) as exc:
        log.error("cannot start worker: %s", exc)
        return EXIT_CONFIG_ERROR
    if not specs and not options.train and not options.serve_trained:
        log.error("cannot start worker: give --models, --train and/or --serve-trained")
        return EXIT_CONFIG_ERROR
    if len(specs) > MODEL_SLOTS:
        log.error("cannot start worker: at most %d models per worker, %d given", MODEL_SLOTS, len(specs))
        return EXIT_CONFIG_ERROR
    if restored.models != options.models:
        log.info("serving %s, as %s says (--reset-models: serve exactly --models)",
                 ", ".join(restored.models) or "no model", restored.source)
    consumers = options.consumers or default_consumers(requested, os.cpu_count() or 1)
    if not 1 <= consumers <= MAX_CONSUMERS:
        log.error("cannot start worker: --consumers must be 1..%d, got %d", MAX_CONSUMERS, consumers)
        return EXIT_CONFIG_ERROR
    group = WorkerGroup(options, settings, specs, requested, consumers, redis_client, stop, restored.current)
    try:
        group.start_probes()
    except OSError as exc:
        log.error("cannot start worker: probes on port %s: %s", settings.probe_port, exc)
        group.close()
        return EXIT_CONFIG_ERROR
    try:
        return group.run()
    finally:
        group.close()


class _StopRequest:
    """SIGTERM/SIGINT to the launcher: remember it; the launcher's loop acts on it."""

    def __init__(self) -> None:
        self.requested = False
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)

    def _on_signal(self, signum: int, _frame: object) -> None:
        if not self.requested:
            log.info("received %s: stopping the worker group", signal.Signals(signum).name)
        self.requested = True


class WorkerGroup:
    """The launcher's view of its device process and consumers."""

    def __init__(self, options: WorkerOptions, settings: WorkerSettings, specs: list[ModelSpec], requested: str,
                 consumers: int, redis_client: redis.Redis, stop: _StopRequest,
                 current: dict[str, str] | None = None):
        self.options, self.settings, self.specs = options, settings, specs
        self.redis, self.stop = redis_client, stop
        self.name = worker_name(options, requested, settings.hostname)
        # A training-only worker takes one job at a time, so that queued training jobs stay in
        # Redis (visible to autoscalers) instead of waiting in this group.
        training_only = options.train and not specs and not options.serve_trained
        self.concurrency = 1 if training_only else settings.concurrency
        self.consumer_count = 1 if training_only else consumers
        self.runtime_dir = Path(tempfile.mkdtemp(prefix="fleet-worker-", dir=_runtime_root()))
        self.address = f"ipc://{self.runtime_dir / 'device.sock'}"
        self.board = StatusBoard.create(self.runtime_dir / "board", self.consumer_count)
        self.context = multiprocessing.get_context("spawn")
        self.device_process: Any = None
        self.consumers: list[Any] = [None] * self.consumer_count
        #: The device's ready message (device, identity, refused models), once it came.
        self.cards: dict[str, Any] | None = None
        self._current = current or {}
        #: What the group serves (workers/serving/serving_plan.py); consumers started later get the latest.
        self.plan = ServingPlan()
        self._plan_lock = threading.Lock()
        self.lifecycle: ModelLifecycle | None = None
        self.heartbeat: Heartbeat | None = None
        self.stats: dict[str, Any] = {}
        self.started_at = time.time()
        self.probes: Any = None
        self._requested_device = requested

    # --- probes -------------------------------------------------------------------------------

    def start_probes(self) -> None:
        """``/livez``, ``/readyz`` (and ``/metrics``) on ``FLEET_PROBE_PORT``, judged from the status board."""
        if self.settings.probe_port is None:
            return
        from producer import telemetry as base
        from workers.process.group_probes import GroupLiveness, GroupReadiness, gather_metrics
        from workers.process.probes import ProbeServer

        ping = redis_connection.redis_client(self.settings, patient=False, socket_timeout=REDIS_CHECK_TIMEOUT_S,
                                             socket_connect_timeout=REDIS_CHECK_TIMEOUT_S).ping
        self.probes = ProbeServer(
            GroupLiveness(self.board, self.settings.device_stall_s, self.settings.consumer_stall_s,
                          self._batched_slots),
            GroupReadiness(self.board, ping), self.settings.probe_port,
            metrics=(lambda: gather_metrics(self.board)) if base.prometheus_export_on() else None).start()

    def _batched_slots(self) -> set[int]:
        """The status-board slots of the batched (not generate) models the group holds now."""
        if self.lifecycle is None:
            return {slot for slot, spec in enumerate(self.specs) if spec.kind.value != "generate"}
        return {slot for ref, slot in self.lifecycle.slots.items()
                if self.lifecycle.plan.cards.get(ref, {}).get("kind") != "generate"}

    # --- processes ----------------------------------------------------------------------------

    def _settings_dict(self) -> dict[str, Any]:
        return self.settings.model_dump(mode="json", exclude={"hostname"}) | {"hostname": self.settings.hostname}

    def _start_device(self) -> Any:
        from workers.serving.device_server import DeviceConfig, device_main

        parent, child = self.context.Pipe(duplex=False)
        config = DeviceConfig(worker_name=self.name, device=self._requested_device,
                              specs=[spec.model_dump(mode="json") for spec in self.specs], address=self.address,
                              board_path=str(self.board.path), settings=self._settings_dict())
        process = self.context.Process(target=device_main, args=(config, child), name="fleet-device")
        process.start()
        child.close()
        self._device_ready = parent
        return process

    def _start_consumer(self, index: int) -> Any:
        from workers.process.consumer_main import ConsumerConfig, consumer_main

        receive, send = self.context.Pipe(duplex=False)
        commands, forward = self.context.Pipe(duplex=False)
        config = ConsumerConfig(worker_name=self.name, node_name=consumer_node_name(self.name, index), index=index,
                                train=self.options.train, concurrency=self.concurrency,
                                consumers=self.consumer_count, address=self.address,
                                board_path=str(self.board.path), run_sweeper=index == 0,
                                settings=self._settings_dict())
        process: Any = self.context.Process(target=consumer_main, args=(config, receive, forward),  # carries pipes
                                            name=f"fleet-consumer-{index}")
        with self._plan_lock:
            process.start()
            receive.close()
            forward.close()
            process.cards_pipe, process.commands = send, commands
            if self.cards is not None:
                ipc.send_json(send, self._consumer_message(self.plan))
        return process

    def _consumer_message(self, plan: ServingPlan) -> dict[str, Any]:
        assert self.cards is not None
        return {"device": self.cards["device"], "identity": self.cards["identity"], "plan": plan.message()}

    def _publish_plan(self, plan: ServingPlan) -> None:
        """Send ``plan`` to every consumer (a consumer started later gets it at its start)."""
        with self._plan_lock:
            self.plan = plan
            for process in self.consumers:
                try:
                    ipc.send_json(process.cards_pipe, plan.message())
                except OSError:  # it died; started again, it gets the plan then
                    continue

    def _announce_plan(self, plan: ServingPlan) -> None:
        """Put ``plan``'s models in the heartbeat and its catalog entries, and beat now."""
        if self.heartbeat is not None:
            self.heartbeat.set_catalog(plan.catalog_entries())
            self.heartbeat.beat()

    # --- life --------------------------------------------------------------------------------

    def run(self) -> int:
        log.info("starting worker %s: device %s, %d consumer process(es), models %s", self.name,
                 self._requested_device, self.consumer_count, ", ".join(s.name for s in self.specs) or "-")
        self.device_process = self._start_device()
        self.consumers = [self._start_consumer(index) for index in range(self.consumer_count)]
        ready = self._wait_for_device()
        if ready is None:
            return self._shutdown(EXIT_LOAD_ERROR if not self.stop.requested else 0)
        if not ready["cards"] and self.specs and not self.options.train:
            log.error("cannot start worker: every model was refused: %s", ready.get("refused"))
            return self._shutdown(EXIT_LOAD_ERROR)
        plan = ServingPlan.serving(ready["cards"], self._current)
        with self._plan_lock:
            self.cards, self.plan = ready, plan
            for process in self.consumers:
                ipc.send_json(process.cards_pipe, self._consumer_message(plan))
        from workers.serving.device_client import DeviceClient

        self.lifecycle = ModelLifecycle(
            self.name, self.settings, self.redis, DeviceClient(self.address, self.board), self.board, plan,
            {spec.name: slot for slot, spec in enumerate(self.specs) if spec.name in plan.cards},
            self._publish_plan, self._announce_plan, self.options.models).start()
        self.heartbeat = Heartbeat(self.redis, self.name, self.snapshot, self.settings.heartbeat_interval_s,
                                   self.settings.heartbeat_interval_s * self.settings.heartbeat_ttl_intervals,
                                   catalog=plan.catalog_entries()).start()
        return self._watch()

    def _wait_for_device(self) -> dict[str, Any] | None:
        """The device's ready message, or None if it failed, died or the group was told to stop."""
        while not self.stop.requested:
            if self._device_ready.poll(WATCH_S):
                try:
                    message = ipc.recv_json(self._device_ready)
                except EOFError:
                    message = {"ok": False, "error": "the device process exited while loading"}
                if message.get("ok"):
                    log.info("device process ready on %s: %s", message["device"],
                             ", ".join(card["name"] for card in message["cards"]) or "no models")
                    return message
                log.error("cannot start worker: loading models failed: %s", message.get("error"))
                return None
            if not self.device_process.is_alive():
                log.error("cannot start worker: the device process exited (code %s) while loading",
                          self.device_process.exitcode)
                return None
        return None

    def _watch(self) -> int:
        assert self.heartbeat is not None  # run() starts it before it watches
        while not self.stop.requested:
            if not self.device_process.is_alive():
                return self._device_lost()
            for index, process in enumerate(self.consumers):
                if not process.is_alive():
                    log.warning("consumer %d exited (code %s); starting it again", index, process.exitcode)
                    self.consumers[index] = self._start_consumer(index)
            ready = self.board.device().state is State.READY and all(
                status.state is State.READY for status in self.board.all_consumers())
            if ready != self.heartbeat.ready:
                self.heartbeat.ready = ready
                self.heartbeat.beat()
                if ready:
                    log.info("worker %s ready", self.name)
            self._take_model_commands(WATCH_S)
        return self._shutdown(0)

    def _take_model_commands(self, wait_s: float) -> None:
        """Wait up to ``wait_s`` for model commands from consumer 0 (the group's mailbox); pass them on."""
        pipe = self.consumers[0].commands
        try:
            if multiprocessing.connection.wait([pipe], wait_s):
                command = ipc.recv_json(pipe)
                if self.lifecycle is not None:
                    self.lifecycle.submit(command)
        except (EOFError, OSError):  # consumer 0 died: it is started again with a new pipe
            time.sleep(wait_s)

    def _device_lost(self) -> int:
        code = self.device_process.exitcode
        self.board.set_device(State.FAILED)  # consumers' waiting jobs end with DeviceLost: handed back
        computing = [entry.job_ids for entry in self.board.device().computing]
        log.error("the device process died (exit code %s) while computing %s; stopping the group", code,
                  "; ".join(",".join(ids) for ids in computing) or "nothing")
        try:
            charge_crash(self.redis, computing, self.settings.result_expires_s)
        except redis.RedisError as exc:
            log.error("could not record which jobs the device was computing: %s", exc)
        self._shutdown(EXIT_DEVICE_LOST)
        return EXIT_DEVICE_LOST

    def _shutdown(self, code: int) -> int:
        """Drain the consumers, then stop the device process; return ``code``."""
        if self.heartbeat is not None:
            self.heartbeat.ready = False
            self.heartbeat.beat()
        for process in self.consumers:
            if process is None:
                continue
            if self.cards is None:
                try:
                    ipc.send_json(process.cards_pipe, None)  # never started consuming: tell it to go
                except OSError:
                    pass
            if process.is_alive():
                os.kill(process.pid, signal.SIGTERM)
        deadline = time.monotonic() + self.settings.drain_grace_s + STOP_MARGIN_S
        for process in self.consumers:
            if process is None:
                continue
            process.join(max(0.1, deadline - time.monotonic()))
            if process.is_alive():
                log.error("consumer pid %d did not drain in time; killing it", process.pid)
                process.kill()
                process.join()
        if self.device_process is not None and self.device_process.is_alive():
            os.kill(self.device_process.pid, signal.SIGTERM)
            self.device_process.join(STOP_MARGIN_S)
            if self.device_process.is_alive():
                self.device_process.kill()
                self.device_process.join()
        log.info("worker %s stopped", self.name)
        return code

    def close(self) -> None:
        if self.lifecycle is not None:
            self.lifecycle.stop()
        if self.heartbeat is not None:
            self.heartbeat.stop()
        if self.probes is not None:
            self.probes.stop()
        self.board.close()
        shutil.rmtree(self.runtime_dir, ignore_errors=True)

    # --- heartbeat ------------------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """The heartbeat body: the device, each consumer and the models, with the device's statistics."""
        device = self.board.device()
        consumers = self.board.all_consumers()
        plan = self.plan
        identity = (self.cards or {}).get("identity", {})
        self.stats = self._device_stats() or self.stats
        return {
            "host": self.settings.hostname, "pid": os.getpid(), "device": (self.cards or {}).get("device"),
            "device_name": identity.get("name"), "device_uuid": identity.get("uuid"),
            "visible_gpus": identity.get("visible_gpus"), "models": plan.announced(), "current": dict(plan.current),
            "train": self.options.train, "serve_trained": self.options.serve_trained,
            "in_flight": sum(c.in_flight for c in consumers),
            "jobs_done": sum(c.jobs_done for c in consumers), "started_at": self.started_at,
            "device_process": {"pid": device.pid, "state": device.state.name.lower(), "batches": device.batches,
                               "tick_age_s": round(time.monotonic() - device.tick, 3) if device.tick else None},
            "consumers": [{"index": c.index, "pid": c.pid, "state": c.state.name.lower(), "in_flight": c.in_flight,
                           "jobs_done": c.jobs_done,
                           "tick_age_s": round(time.monotonic() - c.tick, 3) if c.tick else None}
                          for c in consumers],
            "load": {ref: plan.cards[ref]["load"] for ref in sorted(plan.consuming)},
            "refused": (self.cards or {}).get("refused", {}),
            **self.stats,
        }

    def _device_stats(self) -> dict[str, Any] | None:
        """The device process's batcher and memory statistics (one ``stats`` request), or None."""
        if self.cards is None or not self.device_process.is_alive():
            return None
        from workers.serving.device_client import DeviceClient, DeviceLost

        client = self.__dict__.get("_stats_client")
        if client is None:
            client = self.__dict__["_stats_client"] = DeviceClient(self.address, self.board)
        try:
            reply, _ = client.request({"op": "stats"}, timeout_s=STATS_TIMEOUT_S)
        except (DeviceLost, TimeoutError):
            return None
        return {key: reply[key] for key in ("batching", "memory") if key in reply}


def _runtime_root() -> str | None:
    """Where group runtime directories go: ``/dev/shm`` (memory) when usable, else the temp directory."""
    return "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
