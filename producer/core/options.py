"""Submission options: how a job is sent, as opposed to what it asks (the request). No I/O.

Every submit call takes the same options and validates them here, so a typo (``dealine_s``)
or a wrong type (``priority=2.5``) is refused with ``InvalidRequestError`` before anything is
sent, never accepted and ignored.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping, Sequence
from typing import Annotated, Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    ValidationError,
    field_validator,
)

from producer.celery_config import PRIORITY_DEFAULT
from producer.contract.common import Finite
from producer.errors import InvalidRequestError

#: Job ids a caller may choose: they become Redis key and channel names, so no spaces or glob characters.
JOB_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.:\-]{0,127}$"
JobId = Annotated[StrictStr, Field(pattern=JOB_ID_PATTERN)]
Seconds = Annotated[StrictFloat | StrictInt, Finite]

#: Upper bounds (s): a deadline or result lifetime longer than a month is a mistake, not a plan.
MAX_DEADLINE_S = 30 * 24 * 3600
MAX_RESULT_TTL_S = 30 * 24 * 3600
MAX_BLOCK_S = 3600
MAX_IDEMPOTENCY_KEY_CHARS = 256

#: The options a single-job submit call takes (``embed``, ``classify``, ``generate``, ``train``).
OPTION_NAMES = ("priority", "deadline_s", "idempotency_key", "block_s", "result_ttl_s", "wait_for_worker", "job_id")
#: The options of bulk submissions (``submit_many``, ``embed_many``): one id per job, no idempotency key.
BULK_OPTION_NAMES = ("priority", "deadline_s", "block_s", "result_ttl_s", "wait_for_worker", "job_ids")


class SubmitOptions(BaseModel):
    """How to send a job.

    ``priority``: 0 (served first) to 9, an integer; kombu keeps the steps 0, 3, 6, 9 and rounds
    the rest to them. ``deadline_s``: seconds from now after which the job is not started; it ends
    ``EXPIRED`` at that moment whether or not a worker ever takes it. ``idempotency_key``: within
    the settings' window, the same key with the same request returns the first job; with a
    different request it is refused (``IdempotencyConflictError``). ``block_s``: seconds to wait
    for room when the queue is full, before ``QueueFullError``. ``result_ttl_s``: seconds the
    finished job's result is kept (default ``FLEET_RESULT_EXPIRES_S``). ``wait_for_worker``:
    accept the job even if no live worker serves its model (default ``FLEET_WAIT_FOR_WORKER``).
    ``job_id`` / ``job_ids``: ids to use instead of fresh ones; an id already in use is refused
    (``JobIdConflictError``).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    priority: Annotated[StrictInt, Field(ge=0, le=9)] = PRIORITY_DEFAULT
    deadline_s: Annotated[Seconds, Field(gt=0, le=MAX_DEADLINE_S)] | None = None
    idempotency_key: Annotated[StrictStr, Field(max_length=MAX_IDEMPOTENCY_KEY_CHARS)] | None = None
    block_s: Annotated[Seconds, Field(ge=0, le=MAX_BLOCK_S)] = 0.0
    result_ttl_s: Annotated[StrictInt, Field(ge=1, le=MAX_RESULT_TTL_S)] | None = None
    wait_for_worker: StrictBool | None = None
    job_id: JobId | None = None
    job_ids: list[JobId] | None = None

    @field_validator("idempotency_key")
    @classmethod
    def _key_not_blank(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise ValueError("an idempotency key must contain a non-whitespace character")
        return value


def parse_options(given: Mapping[str, Any], *, bulk: bool = False) -> SubmitOptions:
    """Validate ``given`` (option name -> value) or raise ``InvalidRequestError`` naming each problem."""
    allowed = BULK_OPTION_NAMES if bulk else OPTION_NAMES
    unknown = sorted(set(given) - set(allowed))
    if unknown:
        hints = "".join(did_you_mean(name, allowed) for name in unknown)
        raise InvalidRequestError(f"unknown option(s) {', '.join(map(repr, unknown))}{hints}; options are "
                                  f"{', '.join(allowed)}",
                                  [{"loc": [name], "msg": "unknown option", "type": "extra_forbidden"}
                                   for name in unknown])
    try:
        return SubmitOptions.model_validate(given)
    except ValidationError as exc:
        errors = [{"loc": list(e["loc"]), "msg": e["msg"], "type": e["type"]} for e in exc.errors()]
        summary = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in errors)
        raise InvalidRequestError(f"invalid submission options: {summary}", errors) from None


def did_you_mean(name: str, known: Sequence[str]) -> str:
    """``" (did you mean 'x'?)"`` naming the closest of ``known``, or ``""``."""
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""
