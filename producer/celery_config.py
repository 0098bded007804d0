"""The Celery configuration that defines Fleet's wire format.

Producer and workers build their Celery apps from this one function so that both
agree on serializer, queues, priorities and transport options.
"""

from __future__ import annotations

from typing import Any

from producer import serialization
from producer.redis_connection import is_sentinel_url, sentinel_master_name
from producer.settings import FleetSettings

#: kombu's Redis transport keeps one list per step; lower number = served first.
PRIORITY_STEPS = [0, 3, 6, 9]
#: Priorities on the wire (Celery/kombu convention for Redis: 0 is highest).
PRIORITY_INTERACTIVE = 0
PRIORITY_DEFAULT = 3
PRIORITY_BULK = 6
#: How long a publish keeps trying through a broker outage (kombu's retry policy keys).
PUBLISH_RETRY_POLICY = {"max_retries": 10, "interval_start": 0.2, "interval_step": 0.5, "interval_max": 3.0}


def celery_config(settings: FleetSettings) -> dict[str, Any]:
    """Return the Celery settings shared by every Fleet process.

    JSON only: ``accept_content`` refuses any other serializer, so a pickle or YAML
    message is rejected by the worker and never deserialised. The JSON is written and read
    with orjson (``producer.serialization``, installed here for this process).
    """
    serialization.install()
    transport_options = {
        "visibility_timeout": settings.visibility_timeout_s,
        "priority_steps": PRIORITY_STEPS,
        "queue_order_strategy": "priority",
        # Sweep for messages whose worker died (unacked past the visibility timeout) often enough
        # that they come back within about a quarter of the timeout (kombu: interval * throttle).
        "unacked_restore_interval": max(1, min(10, settings.visibility_timeout_s // 4)),
        "unacked_restore_throttle": 1,
    }
    backend_options: dict[str, Any] = {"visibility_timeout": settings.visibility_timeout_s}
    if is_sentinel_url(settings.redis_url):
        # sentinel://h1:26379;sentinel://h2:26379: kombu (broker) and Celery (results) ask the
        # Sentinels for the current master of this name (docs/RELIABILITY.md, Sentinel).
        transport_options["master_name"] = backend_options["master_name"] = sentinel_master_name(settings)
    return {
        "broker_url": settings.redis_url,
        "result_backend": settings.redis_url,
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "result_accept_content": ["json"],
        "event_serializer": "json",
        "broker_transport_options": transport_options,
        "result_backend_transport_options": backend_options,
        "result_expires": settings.result_expires_s,
        "task_default_priority": PRIORITY_DEFAULT,
        # A publish that meets a broker outage retries for ~21 s in all (0.2 s, growing by 0.5 s
        # up to 3 s, 10 times) before send_task raises: a Redis restart or failover fits in it.
        "task_publish_retry": True,
        "task_publish_retry_policy": PUBLISH_RETRY_POLICY,
        "task_send_sent_event": True,
        "task_track_started": True,
        "broker_connection_retry_on_startup": True,
        "enable_utc": True,
    }
