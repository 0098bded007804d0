"""Flower, the Celery dashboard, as a child process of ``fleet up --flower``.

Flower runs as ``celery --app=workers.app:app flower`` under this interpreter, so it uses the
same Celery app, and thus the same broker (``REDIS_URL``), as the workers. It shows workers
and tasks from the events they send (``worker_send_task_events``, ``task_send_sent_event``);
it only knows about tasks whose events arrive while it runs. Flower's own ``FLOWER_*``
environment variables (``FLOWER_BASIC_AUTH``, ...) reach it unchanged.
"""

from __future__ import annotations

import sys

DEFAULT_PORT = 5555
#: Loopback only: without ``FLOWER_BASIC_AUTH`` anyone who reaches the port can revoke tasks.
ADDRESS = "127.0.0.1"
#: The name ``fleet up`` logs it under.
NAME = "flower"


def flower_command(port: int) -> list[str]:
    """The command line that serves Flower on ``http://127.0.0.1:<port>`` for Fleet's Celery app."""
    return [sys.executable, "-m", "celery", "--app=workers.app:app", "flower",
            f"--address={ADDRESS}", f"--port={port}"]
