"""The Celery configuration that defines Fleet's wire format.

Producer and workers build their Celery apps from this one function so that both
agree on serializer, queues, priorities and transport options.
"""

from __future__ import annotations

from typing import Any

from producer.settings import FleetSettings

#: kombu's Redis transport keeps one list per step; lower number = served first.
PRIORITY_STEPS = [0, 3, 6, 9]
#: Priorities on the wire (Celery/kombu convention for Redis: 0 is highest).
PRIORITY_INTERACTIVE = 0
PRIORITY_DEFAULT = 3
PRIORITY_BULK = 6


def celery_config(settings: FleetSettings) -> dict[str, Any]:
    """Return the Celery settings shared by every Fleet process.

    JSON only: ``accept_content`` refuses any other serializer, so a pickle or YAML
    message is rejected by the worker and never deserialised.
    """
    transport_options = {
        "visibility_timeout": settings.visibility_timeout_s,
        "priority_steps": PRIORITY_STEPS,
        "queue_order_strategy": "priority",
    }
    return {
        "broker_url": settings.redis_url,
        "result_backend": settings.redis_url,
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "result_accept_content": ["json"],
        "event_serializer": "json",
        "broker_transport_options": transport_options,
        "result_backend_transport_options": {"visibility_timeout": settings.visibility_timeout_s},
        "result_expires": settings.result_expires_s,
        "task_default_priority": PRIORITY_DEFAULT,
        "task_send_sent_event": True,
        "task_track_started": True,
        "broker_connection_retry_on_startup": True,
        "enable_utc": True,
    }
