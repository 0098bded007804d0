"""How a ``fleet`` command ends when something outside it fails: one line on stderr and an exit code.

``failure_for(exc)`` turns the errors a user can fix (Redis down or refusing the credentials, a bad
``REDIS_URL`` or ``FLEET_*`` setting, a missing extra, a refused request) into a
``CommandFailure``; anything else is a bug and keeps its traceback. The Redis URL in a message has
its password replaced by ``**``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import IO, Any

import click

from producer.errors import FleetError, InvalidRequest, QueueFull
from producer.optional import MissingExtraError
from producer.redis_connection import RedisURLError, redacted_url
from producer.settings import DEFAULT_REDIS_URL
from producer.version_guard import UntestedVersionError
from workers.commands.exit_codes import ExitCode

#: What to do when Redis cannot be reached, appended to the message.
START_REDIS_HINT = "start Redis there, or set REDIS_URL to one that runs"


class CommandFailure(click.ClickException):
    """A command that ends with ``exit_code`` and the one line ``<command>: <message>`` on stderr."""

    def __init__(self, exit_code: ExitCode, message: str, command: str = "fleet"):
        super().__init__(" ".join(message.split()))  # one line, whatever the cause's text held
        self.exit_code = int(exit_code)  # type: ignore[misc]  # click's own Exit sets it per instance too
        self.command = command

    def show(self, file: IO[Any] | None = None) -> None:
        click.echo(f"{self.command}: {self.format_message()}", file=file, err=file is None)


def configured_redis_url() -> str:
    """The Redis URL the commands use, password redacted (read again: the settings may be what failed)."""
    from producer.settings import FleetSettings

    try:
        url = FleetSettings().redis_url
    except Exception:  # noqa: BLE001 - invalid settings: name the URL the environment gives
        url = os.environ.get("REDIS_URL") or os.environ.get("FLEET_REDIS_URL") or DEFAULT_REDIS_URL
    return redacted_url(url)


def _causes(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and what caused it (``raise ... from``, or raised while handling), outermost first."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def _settings_problem(exc: BaseException) -> str | None:
    from pydantic import ValidationError

    if not isinstance(exc, ValidationError):
        return None
    problems = "; ".join(f"{'.'.join(str(part) for part in error['loc'])}: {error['msg']}" for error in exc.errors())
    return f"invalid {exc.title} from the environment (FLEET_* variables): {problems}"


def _redis_problem(exc: BaseException) -> tuple[ExitCode, str] | None:
    import redis
    from kombu.exceptions import OperationalError

    for cause in _causes(exc):
        if isinstance(cause, redis.AuthenticationError):
            return ExitCode.CONFIG, (f"Redis at {configured_redis_url()} refused the credentials ({cause}): "
                                     "check the user and password in REDIS_URL")
        if isinstance(cause, (redis.ConnectionError, redis.TimeoutError, redis.InvalidResponse, OperationalError)):
            return ExitCode.REDIS_UNAVAILABLE, (f"cannot reach Redis at {configured_redis_url()} ({cause}): "
                                                f"{START_REDIS_HINT}")
    return None


def _explain(exc: BaseException) -> tuple[ExitCode, str] | None:
    if isinstance(exc, (MissingExtraError, UntestedVersionError)):
        return ExitCode.CONFIG, str(exc)
    if isinstance(exc, RedisURLError):
        return ExitCode.CONFIG, f"bad REDIS_URL: {exc}"
    settings = _settings_problem(exc)
    if settings is not None:
        return ExitCode.CONFIG, settings
    redis_failure = _redis_problem(exc)
    if redis_failure is not None:
        return redis_failure
    if isinstance(exc, (InvalidRequest, QueueFull)):
        return ExitCode.REFUSED, f"refused, nothing was enqueued: {exc}"
    if isinstance(exc, FleetError):
        return ExitCode.FAILURE, str(exc)
    return None


def failure_for(exc: BaseException, command: str) -> CommandFailure | None:
    """The ``CommandFailure`` that reports ``exc`` raised by ``command`` (``fleet dlq list``) to the
    user, or None for an error that is a bug (its traceback is then the report)."""
    explained = _explain(exc)
    return None if explained is None else CommandFailure(*explained, command=command)
