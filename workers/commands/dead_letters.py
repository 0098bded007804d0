"""``fleet dlq list|show|retry|purge``: the dead-letter list (``workers/queue/dlq.py``) for people.

Each function prints its answer on stdout and returns the command's exit code.
"""

from __future__ import annotations

import json

import click
import redis

from producer.redis_connection import redis_client
from producer.settings import FleetSettings
from workers.commands.exit_codes import ExitCode
from workers.queue import dlq


def _client() -> redis.Redis:
    return redis_client(FleetSettings())


def list_dead_letters() -> ExitCode:
    """One line per entry, oldest first: ``<job id>  <task>  attempts=<n>  <reason>``."""
    for entry in dlq.list_entries(_client()):
        click.echo(f"{entry['job_id']}  {entry['task']:<15} attempts={entry['attempts']}  {entry['reason']}")
    return ExitCode.OK


def show_dead_letter(job_id: str) -> ExitCode:
    """The entry as indented JSON; ``FAILURE`` if there is none."""
    entry = dlq.get_entry(_client(), job_id)
    if entry is None:
        click.echo(f"no dead-letter entry for job {job_id}", err=True)
        return ExitCode.FAILURE
    click.echo(json.dumps(entry, indent=2))
    return ExitCode.OK


def retry_dead_letter(job_id: str) -> ExitCode:
    """Send the job again under its id with a fresh attempt count; ``FAILURE`` if there is no entry."""
    client = _client()
    entry = dlq.get_entry(client, job_id)
    if entry is None:
        click.echo(f"no dead-letter entry for job {job_id}", err=True)
        return ExitCode.FAILURE
    from workers.queue.app import app

    try:
        dlq.retry(client, app, job_id)
    except dlq.NotRetriable as exc:
        click.echo(str(exc), err=True)
        return ExitCode.FAILURE
    click.echo(f"re-sent job {job_id} to {entry['queue']}")
    return ExitCode.OK


def purge_dead_letters() -> ExitCode:
    """Delete every entry and say how many there were."""
    click.echo(f"purged {dlq.purge(_client())} entries")
    return ExitCode.OK
