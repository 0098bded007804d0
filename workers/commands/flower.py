"""Flower, the Celery dashboard, as a child process of ``fleet up --flower``.

Flower runs as ``celery --app=workers.queue.app:app flower`` under this interpreter, so it uses the
same Celery app, and thus the same broker (``REDIS_URL``), as the workers. It shows workers
and tasks from the events they send (``worker_send_task_events``, ``task_send_sent_event``);
it only knows about tasks whose events arrive while it runs. Flower's own ``FLOWER_*``
environment variables (``FLOWER_BASIC_AUTH``, ...) reach it unchanged.

Flower always runs behind HTTP basic auth: ``FLOWER_BASIC_AUTH`` ("user:password") when set,
else a login generated at start and written to a file only its owner can read (never logged).
"""

from __future__ import annotations

import os
import secrets
import sys
from pathlib import Path

DEFAULT_PORT = 5555
#: Loopback only: without ``FLOWER_BASIC_AUTH`` anyone who reaches the port can revoke tasks.
ADDRESS = "127.0.0.1"
#: The name ``fleet up`` logs it under.
NAME = "flower"
#: User name of the generated login.
GENERATED_USER = "fleet"
#: Where the generated login is written (relative to the working directory), mode 0600.
CREDENTIALS_FILE = Path("var/flower-credentials")


def flower_command(port: int) -> list[str]:
    """The command line that serves Flower on ``http://127.0.0.1:<port>`` for Fleet's Celery app."""
    return [sys.executable, "-m", "celery", "--app=workers.queue.app:app", "flower",
            f"--address={ADDRESS}", f"--port={port}"]


def flower_auth_env(environ: dict[str, str], credentials_file: Path = CREDENTIALS_FILE) -> tuple[dict[str, str], str]:
    """The environment that puts Flower behind basic auth, and a line telling the user how to log in.

    Keeps ``FLOWER_BASIC_AUTH`` from ``environ`` if set; otherwise generates a password for
    user ``fleet`` and writes ``fleet:<password>`` to ``credentials_file`` (mode 0600). The
    returned line names the user and the file, never the password.
    """
    if environ.get("FLOWER_BASIC_AUTH"):
        return {}, "login: FLOWER_BASIC_AUTH"
    login = f"{GENERATED_USER}:{secrets.token_urlsafe(18)}"
    credentials_file.parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(credentials_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as handle:
        handle.write(login + "\n")
    os.chmod(credentials_file, 0o600)
    return {"FLOWER_BASIC_AUTH": login}, f"login: user {GENERATED_USER}, password in {credentials_file} (mode 0600)"
