"""A consumer process of a worker group: a Celery worker (threads pool) that never imports torch.

Spawned by the group's launcher (workers/process/worker_group.py). It imports Celery and
its own code while the device process loads the models, then waits for the group's serving plan
(model cards, queues), builds its runtime (tokenisers, the hand-off to the device) and consumes
the group's queues, following every later plan (workers/serving/plan_follower.py: a model loaded,
switched or unloaded while it runs). Consumer 0 is the group's mailbox for model lifecycle
commands: it passes them to the launcher (workers/queue/model_commands.py).
Its jobs' compute happens in the device process; here they are received, validated,
tokenised, handed over, and answered (results stored, messages acknowledged).

On SIGTERM (the launcher forwards it on shutdown) Celery stops consuming; jobs in flight
get ``FLEET_DRAIN_GRACE_S`` to finish, then the rest are handed back to their queues. The
Celery event loop ticks the group's status board (liveness, workers/queue/consumer_progress.py).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from producer.contract import TRAINING_QUEUE
from workers.process.status_board import State, StatusBoard
from workers.serving import ipc

log = logging.getLogger("fleet.consumer")

@dataclass(frozen=True)
class ConsumerConfig:
    """What a consumer process needs, passed through ``spawn`` (picklable)."""

    worker_name: str
    node_name: str
    index: int
    #: Also take training jobs (queue ``fleet.training``); the models' queues come with the cards.
    train: bool
    #: Task threads for embed and classify jobs (generate jobs get their engine share on top).
    concurrency: int
    #: Consumer processes in the group (each holds its share of a generation engine's slots).
    consumers: int
    address: str
    board_path: str
    run_sweeper: bool
    settings: dict[str, Any] = field(default_factory=dict)


def generation_slots(plan: Any) -> dict[str, int]:
    """Queue -> its generate model's engine slots, for the queues ``plan`` consumes (GenerationFlow's shares)."""
    return {queue: plan.cards[ref]["slots"] for queue, ref in plan.queue_models().items()
            if plan.cards[ref].get("slots")}


def start_drain_watchdog(worker, runtime, grace_s: float, on_exit) -> None:
    """After SIGTERM, give in-flight jobs ``grace_s`` seconds; then hand the rest back and exit.

    Celery's warm shutdown has stopped consuming and waits for running tasks without limit.
    If they outlast the grace period, their unacknowledged messages are restored to their
    queues (kombu's ``restore_unacked_once``) for another worker, ``on_exit()`` runs, and the
    process exits 0. A hand-back is not an attempt (workers/queue/job_context.py).
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
        try:
            # Close the consumer's connections first: a BRPOP still blocked on one of them would
            # otherwise take a restored message straight back into this exiting process.
            channel.async_pool.disconnect()
            channel.qos.restore_unacked_once()
        finally:
            on_exit()
            logging.shutdown()
            os._exit(0)

    threading.Thread(target=watch, name="drain-watchdog", daemon=True).start()


def consumer_main(config: ConsumerConfig, cards_pipe: Any, commands_pipe: Any) -> None:
    """Entry point of a spawned consumer process; ``cards_pipe`` delivers the group's serving plans (the
    first once the device is ready), ``commands_pipe`` takes model commands to the launcher (consumer 0)."""
    from celery import signals

    from workers.observability.logs import configure_logging
    from workers.process.parent_watch import die_with_parent
    from workers.settings import WorkerSettings

    die_with_parent()
    settings = WorkerSettings(**config.settings)
    configure_logging(settings.log_level)
    board = StatusBoard.attach(config.board_path)
    board.set_consumer(config.index, State.STARTING, os.getpid())

    from workers.queue.app import app  # Celery, kombu and the tasks: imported while the device loads
    from workers.queue.event_batching import EventBatching
    from workers.queue.generation_flow import GenerationFlow
    from workers.queue.model_commands import install_model_commands
    from workers.serving import runtime as runtime_module
    from workers.serving.device_client import DeviceClient
    from workers.serving.plan_follower import PlanFollower
    from workers.serving.runtime import ConsumerRuntime
    from workers.serving.serving_plan import ServingPlan

    message = ipc.recv_json(cards_pipe)  # blocks until the device process is ready
    if message is None:
        log.info("consumer %d: the group is stopping before it started", config.index)
        board.set_consumer(config.index, State.STOPPED)
        return
    plan = ServingPlan.from_message(message["plan"])
    runtime = ConsumerRuntime.from_plan(plan, settings=settings, device=message["device"],
                                        client=DeviceClient(config.address, board),
                                        on_counts=lambda in_flight, done: board.consumer_counts(config.index, in_flight,
                                                                                                done))
    runtime_module.install(runtime)

    from producer.redis_connection import redis_client
    from workers.observability import telemetry
    from workers.process.group_probes import start_process_metrics_server
    from workers.queue.consumer_progress import consumer_progress_step

    consumer_telemetry = telemetry.setup_worker(
        runtime.device, models={name: card.kind.value for name, card in runtime.cards.items()},
        device_name=message.get("identity", {}).get("name"), redis_client=redis_client(settings),
        ready=lambda: board.consumer(config.index).state is State.READY)
    board.set_consumer(config.index, State.STARTING, metrics_port=start_process_metrics_server() or 0)
    sweeper = None
    if config.run_sweeper and settings.sweep_interval_s:
        from workers.queue.delivery_sweeper import DeliverySweeper, resend_from_record

        sweeper = DeliverySweeper(redis_client(settings),
                                  lambda job_id, record: resend_from_record(app, job_id, record),
                                  owner=config.worker_name, interval_s=settings.sweep_interval_s,
                                  grace_s=settings.sweep_grace_s).start()

    app.steps["consumer"].add(consumer_progress_step(board, config.index,
                                                     lambda: (runtime.in_flight, runtime.jobs_done)))
    app.steps["consumer"].add(EventBatching)
    flow = GenerationFlow(generation_slots(plan), config.consumers)
    app.steps["consumer"].add(flow.step())
    if flow.shares:
        flow.connect()
    follower = PlanFollower(runtime, board, config.index, plan, cards_pipe,
                            fixed_queues={TRAINING_QUEUE} if config.train else set(),
                            on_plan=lambda new_plan: flow.update(generation_slots(new_plan)))
    app.steps["consumer"].add(follower.step())
    follower.listen()
    install_model_commands(config.worker_name,
                           (lambda command: ipc.send_json(commands_pipe, command)) if config.index == 0 else None)
    queues = follower.queues

    def stop_services() -> None:
        if sweeper is not None:
            sweeper.stop()
        consumer_telemetry.shutdown()  # flush spans and metrics before a hard exit
        runtime.client.close()

    def on_ready(**_: object) -> None:
        log.info("consumer %s ready: consuming %s", config.node_name, ", ".join(queues))

    def on_shutdown(**_: object) -> None:
        board.set_consumer(config.index, State.DRAINING)
        log.info("consumer %s draining: %d job(s) in flight, grace %.1f s", config.node_name, runtime.in_flight,
                 settings.drain_grace_s)
        start_drain_watchdog(worker, runtime, settings.drain_grace_s, on_exit=stop_services)

    signals.worker_ready.connect(on_ready, weak=False)
    signals.worker_shutting_down.connect(on_shutdown, weak=False)
    worker = app.Worker(hostname=config.node_name, pool="threads",
                        concurrency=config.concurrency + flow.extra_threads,
                        # With no queue yet (a --serve-trained worker), not Celery's default queue either.
                        queues=queues, exclude_queues=[] if queues else [app.conf.task_default_queue],
                        loglevel=settings.log_level.upper(), without_mingle=True,
                        without_gossip=True, optimization="fair")
    try:
        worker.start()
    finally:
        stop_services()
        board.set_consumer(config.index, State.STOPPED)
