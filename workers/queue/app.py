"""The worker-side Celery app. Importing it loads no model and no torch (Flower imports it too)."""

from __future__ import annotations

from celery import Celery

from producer.celery_config import celery_config
from producer.serialization import STRICT_JSON
from workers.queue import envelope_guard, redis_patches, results, transport
from workers.queue.results import DEBUG_ERRORS_KEY, result_backend_setting
from workers.settings import WorkerSettings

redis_patches.install()  # busy workers must ride out Redis restarts and failovers (see the module)
envelope_guard.install()  # a queue item that is not a kombu message is dead-lettered, not fatal
transport.install()  # kombu's Redis transport with fewer commands per message (see the module)
results.check_versions()  # the result backend subclasses private methods of Celery's


def worker_config(settings: WorkerSettings) -> dict:
    """Fleet's shared wire config plus the settings that make GPU workers safe and fast.

    Late acks with reject-on-worker-lost: a job whose worker dies returns to the queue.
    Prefetch 1: jobs stay in the Redis list (visible to autoscalers) until a thread is free.
    Fleet's transport and result backend (workers/queue/transport.py, workers/queue/results.py)
    cut the Redis commands per job; STARTED is written by the job's own start round trip
    (workers/queue/job_context.py), so Celery's ``task_track_started`` is off.
    Results: strict JSON (no NaN or infinity reaches Redis), and no worker tracebacks unless
    ``FLEET_DEBUG_ERRORS`` is on. Consumer: every message it cannot run is refused and answered
    instead of ending the worker (``workers/queue/wire_guard.py``).
    """
    config = celery_config(settings)
    config.update({
        "result_backend": result_backend_setting(settings.redis_url),
        "result_serializer": STRICT_JSON,
        DEBUG_ERRORS_KEY: settings.debug_errors,
        "worker_consumer": "workers.queue.wire_guard:GuardedConsumer",
        "task_track_started": False,
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "task_acks_on_failure_or_timeout": True,
        "worker_prefetch_multiplier": 1,
        "worker_send_task_events": True,
        "worker_hijack_root_logger": False,
        "worker_redirect_stdouts": False,
        "worker_cancel_long_running_tasks_on_connection_loss": False,
        # Storing a result retries through a Redis restart or failover instead of failing a job that
        # succeeded (docs/RELIABILITY.md); bounded: 60 tries, up to 2 s apart.
        "result_backend_always_retry": True,
        "result_backend_max_retries": 60,
        "result_backend_base_sleep_between_retries_ms": 50,
        "result_backend_max_sleep_between_retries_ms": 2000,
        "imports": ("workers.queue.tasks", "workers.queue.training_task"),
    })
    return config


app = Celery("fleet")
app.conf.update(worker_config(WorkerSettings()))
