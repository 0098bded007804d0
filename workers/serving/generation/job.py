"""A Fleet generate job on a ``GenerationEngine``.

The job's request becomes a ``Sampling`` and a ``submit``; the engine's pieces travel through a
queue to the job's own thread, which appends them to the job's Redis stream (so the decode
thread never waits on Redis) and polls the job's cancel flag; the ``Outcome`` becomes the
contract's result or the job's end (cancelled, expired, failed).
"""

from __future__ import annotations

import queue
import time

from producer.contract import ErrorCode, GenerateRequest, GenerateResult
from producer.errors import JobFailedError
from workers.serving.generation.engine import GenerationEngine
from workers.serving.generation.limits import PromptTooLong
from workers.serving.generation.sampling import Sampling
from workers.serving.generation.sequence import Finish, Outcome
from workers.serving.inference import Cancelled

#: How often a waiting or running generate job checks its cancel flag (one Redis EXISTS), seconds.
CANCEL_POLL_S = 0.25


def sampling_for(request: GenerateRequest) -> Sampling:
    return Sampling(max_new_tokens=request.max_new_tokens, temperature=float(request.temperature),
                    top_p=request.top_p, seed=request.seed, stop=tuple(request.stop))


def run_generate_job(engine: GenerationEngine, request: GenerateRequest, context) -> GenerateResult:
    """Run ``request`` on ``engine`` for the job ``context`` (``workers.queue.tasks.JobContext``).

    Raises ``JobFailedError(prompt_too_long)``, ``Cancelled``, Celery's ``Ignore`` after storing
    the job as expired, or the model's exception (the task retries it). A streaming job's stream
    gets its end marker however the job ends.
    """
    events: queue.SimpleQueue = queue.SimpleQueue()
    deadline = context.deadline()
    try:
        engine.submit(context.job_id, request.prompt, sampling_for(request),
                      on_piece=events.put if request.stream else None, on_done=events.put,
                      deadline=None if deadline is None else deadline.timestamp(), priority=context.priority,
                      truncate=request.truncate)
    except PromptTooLong as exc:
        if request.stream:
            context.publish_piece(None)
        raise JobFailedError(ErrorCode.PROMPT_TOO_LONG.value, str(exc), exc.details()) from None
    try:
        outcome = _relay(engine, context, events)
    except BaseException:
        engine.cancel(context.job_id)  # nobody waits for this sequence any more
        raise
    finally:
        if request.stream:
            context.publish_piece(None)
    if outcome.finish.completed:
        return GenerateResult(model=request.model, device=str(engine.device), text=outcome.text,
                              tokens_generated=outcome.tokens_generated, finish_reason=outcome.finish.value)
    if outcome.finish is Finish.CANCELLED:
        raise Cancelled()
    if outcome.finish is Finish.EXPIRED:
        context.stop_as_expired()
    if outcome.finish is Finish.FAILED:
        raise outcome.error
    raise RuntimeError(f"generation engine {engine.name} closed before job {context.job_id} finished")


def _relay(engine: GenerationEngine, context, events: queue.SimpleQueue) -> Outcome:
    """Publish the job's pieces as they come and pass a cancel on to the engine; return the outcome."""
    next_check = time.monotonic() + CANCEL_POLL_S
    while True:
        try:
            event = events.get(timeout=max(0.0, next_check - time.monotonic()))
        except queue.Empty:
            event = None
        if isinstance(event, Outcome):
            return event
        if event is not None:
            context.publish_piece(event)
        if time.monotonic() >= next_check:
            if context.cancelled():
                engine.cancel(context.job_id)
            next_check = time.monotonic() + CANCEL_POLL_S
