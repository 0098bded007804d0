"""The one path by which both clients publish jobs, with its clean-up. Synchronous I/O.

``FleetClient`` calls ``Publisher.publish`` directly; ``AsyncFleetClient`` calls it on its one
publishing thread (kombu, which builds and sends Celery's messages, has no asyncio API). One
submission, of one job or many, goes through the same steps:

1. **Route**: each model's queue from the catalog (refused: ``UnknownModelError``,
   ``WrongModelKindError``, ``ModelUnavailableError`` when no live worker serves it); a training
   job's ``register_as`` must not name a model the fleet already has.
2. **Admit**: room in each queue (``QueueFullError``), from a depth estimate (``core/depth.py``).
3. **Record**: the job records and pending entries, in one round trip. When the caller chose job
   ids or gave an idempotency key, one atomic script per chunk of jobs first checks every chosen
   id is free (``JobIdConflictError``) and the key (``IdempotencyConflictError``, or the first job
   back for the same request); generated ids are unique by construction and are not looked up.
4. **Send**: the Celery task messages (and their ``task-sent`` events) in pipelined batches
   through one kombu producer.

If sending fails, the jobs whose messages were not certainly sent are released: records and
pending entries removed (so the delivery sweeper never re-sends a job its caller was told had
failed) and the idempotency key unbound; the caller gets ``FleetConnectionError`` (or
``RedisCommandError``) whose ``sent_job_ids`` lists the jobs that were sent all the same. (When
Redis itself is unreachable the release cannot run either: those jobs stay recorded and the
delivery sweeper may send them once Redis is back, as for any job whose message was lost.)
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import redis
from celery import Celery
from pydantic import BaseModel

from producer import keys, telemetry
from producer.celery_config import celery_config
from producer.contract import ModelKind
from producer.core.catalog import Catalog, CatalogEntry, live_models, parse_catalog
from producer.core.depth import DepthEstimates
from producer.core.jobs import JobPlan, connection_name, plan_jobs
from producer.core.options import SubmitOptions
from producer.core.requests import fixed_queue
from producer.core.router import Coverage
from producer.core.waits import JobInfo
from producer.errors import (
    FleetRedisError,
    IdempotencyConflictError,
    InvalidRequestError,
    JobIdConflictError,
    ModelUnavailableError,
    QueueFullError,
)
from producer.queues import queue_depth
from producer.redis_connection import redis_errors
from producer.scripts import CLAIM_JOBS, RELEASE_JOBS, claim_call, release_call
from producer.settings import FleetSettings

#: Jobs per claim script call (each call blocks Redis while it runs: keep it short).
CLAIM_CHUNK = 500
#: Jobs per pipelined publish round trip (two Redis commands each: the message and its event).
PUBLISH_CHUNK = 1000
#: How often a submission blocked by a full queue re-reads the depth (s).
BACKPRESSURE_POLL_S = 0.05


@dataclass(frozen=True)
class Submitted:
    """One job of a submission: its id, and its plan (None when an idempotency key returned an earlier job)."""

    job_id: str
    plan: JobPlan | None

    def info(self, coverage: Coverage | None) -> JobInfo | None:
        """What a handle knows about the job (None for an earlier job: read from its record when needed)."""
        if self.plan is None:
            return None
        return JobInfo(kind=self.plan.kind, expires_at=self.plan.expires_at, streams=self.plan.streams,
                       coverage=coverage)


class Publisher:
    """Publishes jobs for one client. Thread-safe (the sync client may be shared by threads)."""

    def __init__(self, settings: FleetSettings, redis_client: redis.Redis, prefix: str):
        self.settings = settings
        self.prefix = prefix
        self._redis = redis_client
        self._catalog = Catalog(settings.catalog_cache_s)
        self._depths = DepthEstimates(settings.depth_refresh_s)
        self._claim = redis_client.register_script(CLAIM_JOBS)
        self._release = redis_client.register_script(RELEASE_JOBS)
        self.app = Celery("fleet-producer-publish", set_as_current=False)
        config = celery_config(settings)
        # Results are followed through the client's own subscription; a backend here would make
        # send_task subscribe this process to every job's channel in Celery's result consumer.
        config.pop("result_backend", None)
        config["broker_transport_options"] = {**config["broker_transport_options"],
                                              "client_name": connection_name(prefix)}
        self.app.conf.update(config)

    def close(self) -> None:
        self.app.close()

    def publish(self, kind: str, requests: Sequence[BaseModel], options: SubmitOptions) -> list[Submitted]:
        """Publish one job per request of ``kind``; return them in order (see the module docstring)."""
        if not requests:
            return []
        with redis_errors(self.settings.redis_url):
            queues = self._queues(kind, requests, options)
            plans = plan_jobs(kind, requests, queues, options, self.prefix, time.time())
            per_queue = Counter(queues)
            for queue, count in per_queue.items():
                self._wait_for_room(queue, count, options.block_s)
            if any(plan.chosen_id or plan.idempotency_key for plan in plans):
                existing = self._claim_all(plans)
                if existing is not None:
                    return [Submitted(existing, None)]
            else:
                self._record(plans)
        self._send(plans)
        for queue, count in per_queue.items():
            self._depths.record_added(queue, count)
        return [Submitted(plan.job_id, plan) for plan in plans]

    def models(self) -> dict[str, CatalogEntry]:
        """The catalog as it is now: every model a worker announced, and whether a live worker serves it."""
        with redis_errors(self.settings.redis_url):
            self._refresh_catalog()
        return self._catalog.view()

    # --- steps ------------------------------------------------------------------------------

    def _queues(self, kind: str, requests: Sequence[BaseModel], options: SubmitOptions) -> list[str]:
        queue = fixed_queue(kind)
        if queue is not None:
            for request in requests:
                self._refuse_taken_name(getattr(request, "register_as", None))
            return [queue] * len(requests)
        wait = self.settings.wait_for_worker if options.wait_for_worker is None else options.wait_for_worker
        models = [str(getattr(request, "model", "")) for request in requests]  # inference requests all have one
        by_model = {model: self._queue_for(ModelKind(kind), model, wait) for model in dict.fromkeys(models)}
        return [by_model[model] for model in models]

    def _queue_for(self, kind: ModelKind, model: str, wait_for_worker: bool) -> str:
        if self._catalog.stale(time.monotonic()):
            self._refresh_catalog()
        try:
            return self._catalog.resolve(kind, model, wait_for_worker=wait_for_worker, wall_now=time.time())
        except (InvalidRequestError, ModelUnavailableError):  # perhaps a stale view: look again, once
            self._refresh_catalog()
        return self._catalog.resolve(kind, model, wait_for_worker=wait_for_worker, wall_now=time.time())

    def _refuse_taken_name(self, name: str | None) -> None:
        """A training job may not register its model under a name the fleet already has."""
        if name is None:
            return
        self._refresh_catalog()
        self._catalog.refuse_taken_name(name, trained=bool(self._redis.hexists(keys.TRAINED_MODELS, name)))

    def heartbeats(self) -> list[bytes | str | None]:
        """Every worker's heartbeat body (None for one that expired), read now (two round trips)."""
        with redis_errors(self.settings.redis_url):
            return self._catalog_and_heartbeats()[1]

    def _refresh_catalog(self) -> None:
        """Read ``fleet:catalog`` and every live heartbeat (two round trips)."""
        raw_catalog, heartbeats = self._catalog_and_heartbeats()
        self._catalog.load(parse_catalog(raw_catalog), live_models(heartbeats), time.monotonic())

    def _catalog_and_heartbeats(self) -> tuple[Any, list[bytes | str | None]]:
        with self._redis.pipeline(transaction=False) as pipe:
            pipe.hgetall(keys.CATALOG)
            pipe.smembers(keys.WORKERS)
            raw_catalog, workers = pipe.execute()
        names = sorted(name.decode() for name in workers)
        heartbeats = self._redis.mget([keys.worker_heartbeat(name) for name in names]) if names else []
        return raw_catalog, heartbeats

    def _wait_for_room(self, queue: str, incoming: int, block_s: float) -> None:
        """Return once ``queue`` has room for ``incoming`` more jobs; else ``QueueFullError``."""
        limit = self.settings.max_queue_depth
        if limit <= 0:
            return
        estimate = self._depths.estimate(queue, time.monotonic())
        if estimate is not None and estimate + incoming <= limit:
            return
        give_up_at = time.monotonic() + block_s
        while True:
            depth = queue_depth(self._redis, queue)
            self._depths.record_read(queue, depth, time.monotonic())
            if depth + incoming <= limit:
                return
            if time.monotonic() >= give_up_at:
                raise QueueFullError(queue, depth, limit)
            time.sleep(BACKPRESSURE_POLL_S)

    def _record(self, plans: list[JobPlan]) -> None:
        """Write the job records and pending entries of jobs with generated ids (one round trip)."""
        submitted_at = time.time()
        with self._redis.pipeline(transaction=False) as pipe:
            for plan in plans:
                pipe.hset(keys.job_record(plan.job_id), mapping=plan.record(submitted_at))
                pipe.expire(keys.job_record(plan.job_id), self.settings.result_expires_s)
            pipe.zadd(keys.PENDING, {plan.job_id: submitted_at for plan in plans})
            pipe.execute()

    def _claim_all(self, plans: list[JobPlan]) -> str | None:
        """Claim and record every job (all chunks in one round trip); the earlier job's id when an
        idempotency key returns it. On a conflict nothing stays claimed."""
        chunks = [plans[start:start + CLAIM_CHUNK] for start in range(0, len(plans), CLAIM_CHUNK)]
        submitted_at = time.time()
        calls = [claim_call(chunk, submitted_at, self.settings.result_expires_s, self.settings.idempotency_window_s)
                 for chunk in chunks]
        if len(calls) == 1:
            replies = [self._claim(keys=calls[0][0], args=calls[0][1])]
        else:
            with self._redis.pipeline(transaction=False) as pipe:
                for call_keys, call_args in calls:
                    self._claim(keys=call_keys, args=call_args, client=pipe)
                replies = pipe.execute()
        outcomes = [(reply[0].decode(), reply[1].decode() if len(reply) > 1 else None) for reply in replies]
        refused = next(((word, job_id) for word, job_id in outcomes if word != "ok"), None)
        if refused is None:
            return None
        self._release_chunks([chunk for chunk, (word, _) in zip(chunks, outcomes) if word == "ok"])
        word, job_id = refused
        if word == "same":
            return job_id
        if word == "idempotency_conflict":
            raise IdempotencyConflictError(plans[0].idempotency_key or "", job_id or "")
        raise JobIdConflictError(job_id or "")

    def _send(self, plans: list[JobPlan]) -> None:
        """Send the task messages; on failure release the jobs not certainly sent, then raise."""
        sent = 0
        try:
            with redis_errors(self.settings.redis_url):
                with self.app.producer_or_acquire() as producer:
                    with producer.batch(max_size=2 * PUBLISH_CHUNK + 2) as batch:
                        declared: set[str] = set()
                        for index, plan in enumerate(plans, 1):
                            # Declare each queue once per call (kombu would re-check it for every message).
                            declare: list[Any] | None = [] if plan.queue in declared else None
                            declared.add(plan.queue)
                            self.app.send_task(plan.task, args=[plan.payload()], task_id=plan.job_id,
                                               queue=plan.queue, priority=plan.priority, producer=producer,
                                               declare=declare, expires=plan.expires,
                                               headers={**telemetry.enqueue_headers(), **plan.headers()})
                            if index % PUBLISH_CHUNK == 0:
                                batch.flush()
                                sent = index
        except BaseException as exc:
            self._release_after_failure(plans[sent:])
            if isinstance(exc, FleetRedisError):
                exc.sent_job_ids = [plan.job_id for plan in plans[:sent]]
            raise

    def _release_after_failure(self, plans: list[JobPlan]) -> None:
        try:
            with redis_errors(self.settings.redis_url):
                self._release_chunks([plans[start:start + CLAIM_CHUNK] for start in range(0, len(plans), CLAIM_CHUNK)])
        except FleetRedisError:
            pass  # Redis is gone: the publish error is the one to report

    def _release_chunks(self, chunks: list[list[JobPlan]]) -> None:
        if not chunks:
            return
        with self._redis.pipeline(transaction=False) as pipe:
            for chunk in chunks:
                call_keys, call_args = release_call(chunk)
                self._release(keys=call_keys, args=call_args, client=pipe)
            pipe.execute()
