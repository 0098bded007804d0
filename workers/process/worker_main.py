"""``fleet worker``: pin a device, load models, announce them (heartbeat and catalog), then consume.

Order matters: the device is pinned before torch starts, models load in this process
before the consumer starts (threads pool, never prefork), and the worker reports ready
only once Celery's consumer is running.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from dataclasses import dataclass

import redis
from celery import signals

from producer import keys, redis_connection
from producer.contract import TRAINING_QUEUE
from workers.process.devices import DeviceError, choose_device, device_identity, parse_device, pin_cuda_device
from workers.process.health import Heartbeat
from workers.observability.logs import configure_logging
from workers.serving.registry import RegistryError, load_registry, select, with_trained_models
from workers.settings import WorkerSettings

log = logging.getLogger("fleet.worker")

EXIT_CONFIG_ERROR = 2
EXIT_LOAD_ERROR = 3


@dataclass(frozen=True)
class WorkerOptions:
    """What ``fleet worker`` was asked to do."""

    device: str
    models: list[str]
    name: str | None = None
    train: bool = False


def worker_name(options: WorkerOptions, device: str, hostname: str) -> str:
    """Celery node name ``fleet-<device>@<host>`` unless ``--name`` gave one."""
    if options.name:
        return options.name if "@" in options.name else f"{options.name}@{hostname}"
    tag = device.replace(":", "")
    if device.startswith("cuda") and os.environ.get("CUDA_VISIBLE_DEVICES"):
        tag = f"gpu{os.environ['CUDA_VISIBLE_DEVICES']}"
    return f"fleet-{tag}@{hostname}"


def catalog_entries(specs) -> dict[str, dict]:
    """The catalog entries of the models this worker serves; its heartbeat keeps them in ``fleet:catalog``
    (with ``last_seen``), so that clients send only jobs a live worker will take."""
    return {spec.name: {"kind": spec.kind.value, "queue": spec.queue} for spec in specs}


def exit_before_consuming(signum: int, _frame: object) -> None:
    """SIGTERM while loading: nothing was taken from a queue yet, so exit cleanly at once."""
    log.info("received %s before consuming: exiting", signal.Signals(signum).name)
    raise SystemExit(0)


def start_drain_watchdog(worker, runtime, grace_s: float, on_exit, redis_client: redis.Redis) -> None:
    """After SIGTERM, give in-flight jobs ``grace_s`` seconds; then hand the rest back and exit.

    Celery's warm shutdown has stopped consuming and waits for running tasks without limit.
    If they outlast the grace period, their unacknowledged messages are restored to their
    queues (kombu's ``restore_unacked_once``) for another worker, ``on_exit()`` runs, and the
    process exits 0.
    """

    def watch() -> None:
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline:
            if runtime.in_flight == 0:
                return
            time.sleep(0.1)
        if runtime.in_flight == 0:
            return
        log.warning("drain grace of %.1f s over with %d job(s) in flight: handing them back", grace_s,
                    runtime.in_flight)
        channel = worker.consumer.task_consumer.channel
        handed_back = list(runtime.in_flight_ids)
        try:
            # A hand-back is not a failed attempt: undo the count so it does not move the job toward the DLQ.
            with redis_client.pipeline(transaction=False) as pipe:
                for job_id in handed_back:
                    pipe.decr(keys.attempts(job_id))
                pipe.execute()
            # Close the consumer's connections first: a BRPOP still blocked on one of them would
            # otherwise take a restored message straight back into this exiting process.
            channel.async_pool.disconnect()
            channel.qos.restore_unacked_once()
        finally:
            on_exit()
            logging.shutdown()
            os._exit(0)

    threading.Thread(target=watch, name="drain-watchdog", daemon=True).start()


def start_delivery_sweeper(redis_client: redis.Redis, name: str, settings: WorkerSettings):
    """Start this worker's share of the delivery sweep (None when ``FLEET_SWEEP_INTERVAL_S`` is 0)."""
    if not settings.sweep_interval_s:
        return None
    from workers.queue.app import app
    from workers.queue.delivery_sweeper import DeliverySweeper, resend_from_record

    return DeliverySweeper(redis_client, lambda job_id, record: resend_from_record(app, job_id, record), owner=name,
                           interval_s=settings.sweep_interval_s, grace_s=settings.sweep_grace_s).start()


def run_worker(options: WorkerOptions, settings: WorkerSettings | None = None) -> int:
    """Run one worker until it is shut down; return the process exit code."""
    settings = settings or WorkerSettings()
    configure_logging(settings.log_level)
    redis_client = redis_connection.redis_client(settings)
    try:
        requested = pin_cuda_device(parse_device(options.device))
        trained = {name.decode(): raw for name, raw in redis_client.hgetall(keys.TRAINED_MODELS).items()}
        registry = with_trained_models(load_registry(settings.model_registry), trained)
        specs = select(registry, options.models)
    except (DeviceError, RegistryError) as exc:
        log.error("cannot start worker: %s", exc)
        return EXIT_CONFIG_ERROR
    if not specs and not options.train:
        log.error("cannot start worker: give --models and/or --train")
        return EXIT_CONFIG_ERROR

    import torch  # first torch import: after pinning, in the process that will use the device

    from workers.serving import runtime as runtime_module
    from workers.serving.runtime import WorkerRuntime

    try:
        choice = choose_device(requested)
    except DeviceError as exc:
        log.error("cannot start worker: %s", exc)
        return EXIT_CONFIG_ERROR
    log.info("device %s: %s", choice.device, choice.reason)
    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)

    log.info("loading %d model(s) on %s: %s", len(specs), choice.device, ", ".join(s.name for s in specs))
    try:
        runtime = WorkerRuntime.load(settings, choice.device, specs)
    except Exception as exc:  # noqa: BLE001 - any load failure stops the worker with its reason
        log.error("cannot start worker: loading models failed: %s: %s", type(exc).__name__, exc)
        return EXIT_LOAD_ERROR
    runtime_module.install(runtime)

    name = worker_name(options, choice.device, settings.hostname)
    identity = device_identity(choice.device)
    from workers.observability import telemetry

    worker_telemetry = telemetry.setup_worker(choice.device, runtime=runtime, device_name=identity["name"])

    def snapshot() -> dict:
        return {
            "host": settings.hostname, "pid": os.getpid(), "device": choice.device, "device_name": identity["name"],
            "device_uuid": identity["uuid"], "visible_gpus": identity["visible_gpus"], "models": sorted(runtime.models), "train": options.train,
            "in_flight": runtime.in_flight, "jobs_done": runtime.jobs_done, "last_job_at": runtime.last_job_at, "started_at": runtime.started_at,
            "load": {n: {"load_s": r.report.load_s, "rss_bytes": r.report.rss_bytes,
                         "cuda_allocated_bytes": r.report.cuda_allocated_bytes,
                         "cuda_reserved_bytes": r.report.cuda_reserved_bytes} for n, r in runtime.models.items()},
            "batching": {n: r.batcher.stats_snapshot() for n, r in runtime.models.items() if r.batcher is not None},
        }

    heartbeat = Heartbeat(redis_client, name, snapshot, settings.heartbeat_interval_s,
                          settings.heartbeat_interval_s * settings.heartbeat_ttl_intervals,
                          catalog=catalog_entries(specs)).start()
    sweeper = start_delivery_sweeper(redis_client, name, settings)

    def on_ready(**_: object) -> None:
        heartbeat.ready = True
        heartbeat.beat()
        log.info("worker %s ready: consuming %s", name, ", ".join(queues))

    def on_shutdown(**_: object) -> None:
        heartbeat.ready = False
        heartbeat.beat()
        log.info("draining: %d job(s) in flight, grace %.1f s", runtime.in_flight, settings.drain_grace_s)
        start_drain_watchdog(worker, runtime, settings.drain_grace_s, on_exit=stop_services,
                             redis_client=redis_client)

    def stop_services() -> None:
        heartbeat.stop()
        if sweeper is not None:
            sweeper.stop()
        worker_telemetry.shutdown()  # flush spans and metrics before a hard exit

    queues = [spec.queue for spec in specs] + ([TRAINING_QUEUE] if options.train else [])
    # A training-only worker takes one job at a time, so that queued training jobs stay in
    # Redis (visible to autoscalers) instead of waiting in this process.
    concurrency = 1 if options.train and not specs else settings.concurrency
    signals.worker_ready.connect(on_ready, weak=False)
    signals.worker_shutting_down.connect(on_shutdown, weak=False)

    from workers.queue.app import app

    worker = app.Worker(hostname=name, pool="threads", concurrency=concurrency, queues=queues,
                        loglevel=settings.log_level.upper(), without_mingle=True, without_gossip=True,
                        optimization="fair")
    try:
        worker.start()
    finally:
        stop_services()
        runtime.close()
    return worker.exitcode or 0

