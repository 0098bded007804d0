"""Every Redis key Fleet itself reads or writes, in one place.

Celery's own keys (queue lists ``fleet.<kind>.<model>``, results ``celery-task-meta-<id>``)
are named by Celery and kombu; these are Fleet's additions beside them.
"""

from __future__ import annotations

PREFIX = "fleet"

#: Hash: model reference -> JSON ``{"kind": ..., "queue": ..., "last_seen": ...}`` of every model the
#: fleet serves or served: a name (``minilm``; for a versioned model, its current version's queue) and
#: each ``name@version`` (docs/PROTOCOL.md, "Model versions").
CATALOG = f"{PREFIX}:catalog"

#: Hash: model name -> JSON registry entry of a model a training job produced (``register_as``).
#: Workers merge these with their registry file at start.
TRAINED_MODELS = f"{PREFIX}:trained-models"

#: Set of worker names that have sent a heartbeat; each has a ``worker_heartbeat`` key.
WORKERS = f"{PREFIX}:workers"


def worker_models(worker_name: str) -> str:
    """String: JSON ``{"models": [refs], "current": {name: ref}, "at": <UNIX time>}``, what the worker group
    serves now, rewritten at every change (load, unload, switch); a group started again under the same
    name serves these again (docs/PROTOCOL.md, "Model lifecycle"). No expiry."""
    return f"{PREFIX}:worker-models:{worker_name}"


def model_replies(command_id: str) -> str:
    """List: the final ``ModelCommandReply`` JSON of each worker group a lifecycle command reached
    (RPUSH by the workers, BLPOP by the sender); expires an hour after the last push."""
    return f"{PREFIX}:model-replies:{command_id}"


def job_record(job_id: str) -> str:
    """Hash describing a submitted job (kind, model, queue, submitted_at; and, until it starts,
    task, priority, expires and request, so that a job lost in delivery can be sent again).
    Expires with results."""
    return f"{PREFIX}:job:{job_id}"


#: Sorted set: job id -> submission time, for every job submitted through ``FleetClient`` whose
#: first delivery has not started yet. Workers remove a job when it starts; the delivery
#: sweeper (workers/queue/delivery_sweeper.py) re-sends jobs that stay here but are in no queue.
PENDING = f"{PREFIX}:pending"

#: String lock: the worker that runs this interval's delivery sweep.
SWEEPER_LOCK = f"{PREFIX}:sweeper-lock"

#: Set: jobs the last delivery sweep found in no queue and not unacked (re-sent if found again).
MISSING_JOBS = f"{PREFIX}:missing"

#: Hash: job id -> JSON dead-letter entry (task, queue, payload, reason, attempts, at).
DEAD_LETTERS = f"{PREFIX}:dlq"


def crash_record(job_id: str) -> str:
    """Hash of a job's part in device-process crashes: ``charges`` (crashes while it was computed alone)
    and ``suspect`` ("1": it shared a batch that crashed, so it runs alone next). Written by the worker's
    launcher, read when the job is delivered again (workers/queue/job_context.py). Expires with results."""
    return f"{PREFIX}:crash:{job_id}"


def idempotency(key: str) -> str:
    """String ``"<sha256 of the job's kind and request> <job id>"``: the job first submitted with this
    idempotency key, and what it asked (expires with the key's window; docs/PROTOCOL.md)."""
    return f"{PREFIX}:idem:{key}"


def cancel_flag(job_id: str) -> str:
    """String set when a job is cancelled; workers check it before and while running."""
    return f"{PREFIX}:cancel:{job_id}"


def worker_heartbeat(worker_name: str) -> str:
    """JSON heartbeat of one worker, with a TTL: the key vanishes when the worker stops beating."""
    return f"{PREFIX}:heartbeat:{worker_name}"


def token_stream(job_id: str) -> str:
    """Redis stream of generated text pieces for a streaming generate job; ends with a ``done`` entry."""
    return f"{PREFIX}:stream:{job_id}"
