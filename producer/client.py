"""The synchronous producer API: ``FleetClient`` submits jobs, ``JobHandle`` follows one.

Nothing here imports torch or worker code; jobs are sent by task name as JSON.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from datetime import UTC, datetime
from typing import Any

import redis
from celery import Celery, states
from celery.exceptions import TimeoutError as CeleryTimeout
from celery.result import AsyncResult
from pydantic import BaseModel, ValidationError

from producer import keys, telemetry
from producer.admission import claim_idempotency_key, release_idempotency_key, wait_for_room
from producer.celery_config import PRIORITY_DEFAULT, celery_config
from producer.contract import (
    CELERY_STATE_TO_STATUS,
    TASK_FOR_KIND,
    TASK_TRAIN,
    TRAINING_QUEUE,
    ClassifyRequest,
    ClassifyResult,
    EmbedRequest,
    EmbedResult,
    GenerateRequest,
    GenerateResult,
    JobStatus,
    ModelKind,
    TrainProgress,
    TrainRequest,
    TrainResult,
    inference_queue,
)
from producer.contract.inference import EmbedEncoding
from producer.errors import (
    FleetError,
    InvalidRequest,
    JobCancelled,
    JobExpired,
    JobFailedError,
    JobTimeout,
    UnknownModel,
    WrongModelKind,
)
from producer.redis_connection import redis_client
from producer.settings import FleetSettings

_RESULT_MODELS: dict[str, type[BaseModel]] = {
    ModelKind.EMBED.value: EmbedResult,
    ModelKind.CLASSIFY.value: ClassifyResult,
    ModelKind.GENERATE.value: GenerateResult,
    "train": TrainResult,
}
#: Keyword arguments of the submit methods that are submission options, not request fields.
SUBMIT_OPTIONS = ("deadline_s", "idempotency_key", "block_s")


def validate_request(model_cls: type[BaseModel], fields: dict[str, Any]) -> BaseModel:
    """Build ``model_cls`` from ``fields`` or raise ``InvalidRequest`` listing every problem."""
    try:
        return model_cls.model_validate(fields)
    except ValidationError as exc:
        errors = [{"loc": list(e["loc"]), "msg": e["msg"], "type": e["type"]} for e in exc.errors()]
        summary = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'request'}: {e['msg']}" for e in errors)
        raise InvalidRequest(f"invalid {model_cls.__name__}: {summary}", errors) from None


class ModelCatalog:
    """Read-through cache of the fleet's model catalog (``keys.CATALOG`` in Redis)."""

    def __init__(self, redis_client: redis.Redis, cache_s: float):
        self._redis = redis_client
        self._cache_s = cache_s
        self._entries: dict[str, dict[str, Any]] = {}
        self._loaded_at = float("-inf")

    def entries(self) -> dict[str, dict[str, Any]]:
        """Return ``{model_name: {"kind": ..., "queue": ...}}``, refreshed every ``cache_s`` seconds."""
        now = time.monotonic()
        if now - self._loaded_at > self._cache_s:
            raw = self._redis.hgetall(keys.CATALOG)
            self._entries = {name.decode(): json.loads(value) for name, value in raw.items()}
            self._loaded_at = now
        return self._entries

    def queue_for(self, kind: ModelKind, model: str) -> str:
        """Return the queue for ``model`` or raise ``UnknownModel`` / ``WrongModelKind``."""
        entry = self.entries().get(model)
        if entry is None:
            self._loaded_at = float("-inf")  # a new model may have been registered since
            entry = self.entries().get(model)
        if entry is None:
            known = ", ".join(sorted(self._entries)) or "none"
            raise UnknownModel(f"unknown model {model!r}; the fleet serves: {known}")
        if entry["kind"] != kind.value:
            raise WrongModelKind(f"model {model!r} serves {entry['kind']!r} jobs, not {kind.value!r}")
        return inference_queue(kind, model)


class JobHandle:
    """A submitted job. Cheap to create; every method asks Redis afresh."""

    def __init__(self, client: FleetClient, job_id: str, kind: str | None = None):
        self._client = client
        self.id = job_id
        self._kind = kind

    def __repr__(self) -> str:
        return f"JobHandle(id={self.id!r}, kind={self.kind!r})"

    @property
    def kind(self) -> str | None:
        """The job's kind (``embed``, ...), read from its job record when not known locally."""
        if self._kind is None:
            raw = self._client._redis.hget(keys.job_record(self.id), "kind")
            self._kind = raw.decode() if raw else None
        return self._kind

    @property
    def _async_result(self) -> AsyncResult:
        return AsyncResult(self.id, app=self._client.celery)

    def status(self) -> JobStatus:
        """Current status. ``UNKNOWN`` when Redis holds neither a record nor a result for the id."""
        async_result = self._async_result
        state = async_result.state
        if state == "PENDING" and not self._client._redis.exists(keys.job_record(self.id)):
            return JobStatus.UNKNOWN
        if state == "REVOKED" and _revoked_as_expired(async_result.result):
            return JobStatus.EXPIRED
        return CELERY_STATE_TO_STATUS.get(state, JobStatus.UNKNOWN)

    def result(self, timeout: float | None = 60.0) -> BaseModel:
        """Wait up to ``timeout`` seconds (None: forever) and return the typed result.

        Raises ``JobFailedError`` (with ``.code``) if the job failed, ``JobCancelled`` if it
        was cancelled, ``JobTimeout`` if no result arrived in time. Waiting uses the result
        backend's pub/sub, not polling.
        """
        async_result = self._async_result
        try:
            value = async_result.get(timeout=timeout, propagate=False)
        except CeleryTimeout:
            raise JobTimeout(f"job {self.id} did not finish within {timeout} s") from None
        return self._client._interpret(self.id, async_result.state, value, self.kind)

    def cancel(self) -> None:
        """Cancel the job: a queued job never runs, a running one stops at its next safe point."""
        self._client._cancel(self.id)

    def progress(self) -> TrainProgress | None:
        """The latest progress a running training job reported, or None (not started, or not training)."""
        async_result = self._async_result
        if async_result.state != "PROGRESS" or not isinstance(async_result.info, dict):
            return None
        return TrainProgress.model_validate(async_result.info)

    def stream(self, timeout: float | None = 60.0) -> Iterator[str]:
        """Yield generated text pieces as the worker produces them (``generate(..., stream=True)``).

        Reads the job's Redis stream with blocking XREAD (no polling). ``timeout`` bounds the
        wait for each next piece, in seconds. After the last piece the job's result is checked,
        so a failed or cancelled job raises as ``result()`` would.
        """
        if self._client._redis.hget(keys.job_record(self.id), "stream") != b"1":
            yield self.result(timeout=timeout).text  # not a streaming job: the whole text at once
            return
        stream_key = keys.token_stream(self.id)
        last_id = "0-0"
        block_ms = None if timeout is None else max(1, int(timeout * 1000))
        while True:
            reply = self._client._redis.xread({stream_key: last_id}, count=64, block=block_ms or 0)
            if not reply:
                if self.status().finished:
                    self.result(timeout=0.1)
                    return
                raise JobTimeout(f"no streamed output from job {self.id} within {timeout} s")
            for entry_id, fields in reply[0][1]:
                last_id = entry_id
                if b"done" in fields:
                    self.result(timeout=timeout)
                    return
                yield fields[b"piece"].decode()


class FleetClient:
    """Submit jobs to a Fleet and follow them.

    ``redis_url`` defaults to ``$REDIS_URL``, else ``redis://127.0.0.1:6379/0``.
    Validation happens here, before anything is enqueued.
    """

    def __init__(self, redis_url: str | None = None, *, settings: FleetSettings | None = None):
        settings = settings or FleetSettings()
        if redis_url is not None:
            settings = settings.model_copy(update={"redis_url": redis_url})
        self.settings = settings
        self.celery = Celery("fleet-producer", set_as_current=False)
        self.celery.conf.update(celery_config(settings))
        self._redis = redis_client(settings)
        self.catalog = ModelCatalog(self._redis, settings.catalog_cache_s)
        telemetry.setup_producer()  # traces task publishing; a no-op unless an OTLP endpoint is set

    def close(self) -> None:
        """Release Redis connections."""
        self._redis.close()
        self.celery.close()
        if getattr(self, "_publisher_app", None) is not None:
            self._publisher_app.close()

    def __enter__(self) -> FleetClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # --- submitting -----------------------------------------------------------------

    def embed(self, texts: Sequence[str], model: str = "minilm", *, normalize: bool = True,
              encoding: EmbedEncoding = "float", priority: int = PRIORITY_DEFAULT, **options: Any) -> JobHandle:
        """Submit an embedding job for ``texts``; see ``EmbedRequest`` for limits.

        ``encoding``: ``"float"`` (result ``vectors``) or ``"base64"`` (result ``vectors_b64``: float32
        bytes, much cheaper for big jobs); ``EmbedResult.float_vectors()`` reads either.
        ``options``: ``deadline_s``, ``idempotency_key``, ``block_s`` (see ``_submit``).
        """
        request = validate_request(EmbedRequest, {"texts": _as_list(texts), "model": model, "normalize": normalize,
                                                  "encoding": encoding})
        return self._submit_inference(ModelKind.EMBED, request, priority=priority, **options)

    def classify(self, texts: Sequence[str] | None = None, model: str | None = None, *,
                 inputs: Sequence[Sequence[float]] | None = None, top_k: int = 1,
                 priority: int = PRIORITY_DEFAULT, **options: Any) -> JobHandle:
        """Submit a classification job for ``texts`` (text classifiers) or ``inputs`` (feature vectors).

        The result lists ``top_k`` labels with softmax scores per input.
        """
        fields = {"model": model, "top_k": top_k}
        if texts is not None:
            fields["texts"] = _as_list(texts)
        if inputs is not None:
            fields["inputs"] = [list(vector) for vector in inputs]
        request = validate_request(ClassifyRequest, fields)
        return self._submit_inference(ModelKind.CLASSIFY, request, priority=priority, **options)

    def generate(self, prompt: str, model: str, *, priority: int = PRIORITY_DEFAULT, **fields: Any) -> JobHandle:
        """Submit a generation job; ``fields`` are ``GenerateRequest`` fields (max_new_tokens, ...)
        and submission options (``deadline_s``, ``idempotency_key``, ``block_s``)."""
        options = {name: fields.pop(name) for name in SUBMIT_OPTIONS if name in fields}
        request = validate_request(GenerateRequest, {"prompt": prompt, "model": model, **fields})
        return self._submit_inference(ModelKind.GENERATE, request, priority=priority, **options)

    def job(self, job_id: str) -> JobHandle:
        """Return the handle of an existing job, e.g. one submitted by another process."""
        return JobHandle(self, job_id)

    def train(self, kind: str, dataset: str | None = None, **fields: Any) -> JobHandle:
        """Submit a training job; ``fields`` are ``TrainRequest`` fields (epochs, seed, ...).

        Unset fields take the kind's defaults. Submission options (``priority``, ``deadline_s``,
        ``idempotency_key``, ``block_s``) may be given too.
        """
        options = {name: fields.pop(name) for name in SUBMIT_OPTIONS if name in fields}
        request = validate_request(TrainRequest, {"kind": kind, **({"dataset": dataset} if dataset else {}), **fields})
        return self._submit("train", TASK_TRAIN, TRAINING_QUEUE, request, **options)

    def _submit_inference(self, kind: ModelKind, request: BaseModel, **options: Any) -> JobHandle:
        queue = self.catalog.queue_for(kind, request.model)
        return self._submit(kind.value, TASK_FOR_KIND[kind], queue, request, **options)

    def _submit(self, kind: str, task_name: str, queue: str, request: BaseModel, *,
                priority: int = PRIORITY_DEFAULT, deadline_s: float | None = None,
                idempotency_key: str | None = None, block_s: float = 0.0) -> JobHandle:
        """Publish one job after the admission checks.

        ``priority``: 0 (first) to 9. ``deadline_s``: seconds from now after which the job is
        not started (it ends as expired). ``idempotency_key``: within the settings' window, the
        same key returns the first job instead of submitting again. ``block_s``: how long to
        wait for room when the queue is at ``max_queue_depth`` before raising ``QueueFull``.
        """
        if not 0 <= priority <= 9:
            raise InvalidRequest(f"priority must be 0..9, got {priority}")
        if deadline_s is not None and deadline_s <= 0:
            raise InvalidRequest(f"deadline_s must be > 0, got {deadline_s}")
        wait_for_room(self._redis, queue, self.settings.max_queue_depth, block_s)
        job_id = str(uuid.uuid4())
        if idempotency_key is not None:
            existing = claim_idempotency_key(self._redis, idempotency_key, job_id, self.settings.idempotency_window_s)
            if existing is not None:
                return JobHandle(self, existing)
        submitted_at = time.time()
        expires = None if deadline_s is None else datetime.fromtimestamp(submitted_at + deadline_s, UTC)
        record = _job_record(kind, request, queue, submitted_at, task=task_name, priority=priority, expires=expires)
        with self._redis.pipeline(transaction=False) as pipe:
            _record_jobs(pipe, {job_id: record}, self.settings.result_expires_s)
            pipe.execute()
        try:
            self.celery.send_task(
                task_name, args=[request.model_dump(mode="json")], task_id=job_id,
                queue=queue, priority=priority, expires=expires, headers=telemetry.enqueue_headers(),
            )
        except Exception:
            self._redis.zrem(keys.PENDING, job_id)  # never sent: nothing for the sweeper to re-send
            if idempotency_key is not None:
                release_idempotency_key(self._redis, idempotency_key, job_id)
            raise
        return JobHandle(self, job_id, kind)

    # --- many jobs at once ----------------------------------------------------------

    def embed_many(self, texts_per_job: Iterable[Sequence[str]], model: str = "minilm", *, normalize: bool = True,
                   encoding: EmbedEncoding = "float", priority: int = PRIORITY_DEFAULT,
                   deadline_s: float | None = None, block_s: float = 0.0) -> list[JobHandle]:
        """Submit one embedding job per entry of ``texts_per_job``; return their handles in order.

        Every request is validated before anything is sent (one bad entry raises
        ``InvalidRequest`` naming its index, and nothing is enqueued). Sending costs a fixed
        number of Redis round trips, not one per job: see ``submit_many``. ``encoding`` as for ``embed``.
        """
        requests = []
        for index, texts in enumerate(texts_per_job):
            try:
                requests.append(validate_request(EmbedRequest, {"texts": _as_list(texts), "model": model,
                                                                "normalize": normalize, "encoding": encoding}))
            except InvalidRequest as exc:
                raise type(exc)(f"job {index}: {exc}", exc.errors) from None
        return self.submit_many(ModelKind.EMBED, requests, priority=priority, deadline_s=deadline_s,
                                block_s=block_s)

    def submit_many(self, kind: ModelKind | str, requests: Sequence[BaseModel | dict[str, Any]], *,
                    priority: int = PRIORITY_DEFAULT, deadline_s: float | None = None,
                    block_s: float = 0.0, job_ids: Sequence[str] | None = None) -> list[JobHandle]:
        """Submit many jobs of one ``kind`` (requests as contract models or plain dicts); handles in order.

        All job records are written in one Redis pipeline, then all task messages (and their
        ``task-sent`` events) are published through one kombu producer in pipelined batches
        (kombu's ``Producer.batch``): a constant number of round trips instead of two or three
        per job. The messages are exactly those ``send_task`` builds for single jobs.
        ``priority``, ``deadline_s`` and ``block_s`` mean what they mean for one job (``_submit``);
        the queue-depth admission check counts the whole submission at once. ``job_ids``: ids to
        use instead of fresh UUIDs (one per request).
        """
        kind = ModelKind(kind)
        if not 0 <= priority <= 9:
            raise InvalidRequest(f"priority must be 0..9, got {priority}")
        if deadline_s is not None and deadline_s <= 0:
            raise InvalidRequest(f"deadline_s must be > 0, got {deadline_s}")
        request_cls = {ModelKind.EMBED: EmbedRequest, ModelKind.CLASSIFY: ClassifyRequest,
                       ModelKind.GENERATE: GenerateRequest}[kind]
        checked = [request if isinstance(request, request_cls) else validate_request(request_cls, dict(request))
                   for request in requests]
        if not checked:
            return []
        queues = {model: self.catalog.queue_for(kind, model) for model in {r.model for r in checked}}
        for queue in set(queues.values()):
            wait_for_room(self._redis, queue, self.settings.max_queue_depth, block_s,
                          incoming=sum(1 for r in checked if queues[r.model] == queue))
        if job_ids is None:
            job_ids = [str(uuid.uuid4()) for _ in checked]
        elif len(job_ids) != len(checked):
            raise InvalidRequest(f"{len(job_ids)} job ids for {len(checked)} requests")
        submitted_at = time.time()
        expires = None if deadline_s is None else datetime.fromtimestamp(submitted_at + deadline_s, UTC)
        task_name = TASK_FOR_KIND[kind]
        records = {job_id: _job_record(kind, request, queues[request.model], submitted_at, task=task_name,
                                       priority=priority, expires=expires)
                   for job_id, request in zip(job_ids, checked)}
        with self._redis.pipeline(transaction=False) as pipe:
            _record_jobs(pipe, records, self.settings.result_expires_s)
            pipe.execute()
        publisher = self._publisher()
        declared: set[str] = set()
        with publisher.producer_or_acquire() as producer:
            with producer.batch(max_size=PUBLISH_BATCH_OPS):
                for job_id, request in zip(job_ids, checked):
                    queue = queues[request.model]
                    # Declare each queue once per call (kombu would re-check it for every message).
                    declare = [] if queue in declared else None
                    declared.add(queue)
                    publisher.send_task(task_name, args=[request.model_dump(mode="json")], task_id=job_id,
                                        queue=queue, priority=priority, producer=producer, declare=declare,
                                        expires=expires, headers=telemetry.enqueue_headers())
        return [JobHandle(self, job_id, kind.value) for job_id in job_ids]

    def _publisher(self) -> Celery:
        """A send-only Celery app (no result backend) for ``submit_many``.

        With the Redis result backend, ``send_task`` subscribes this process to every job's
        result channel in Celery's own result consumer; results collected by ``gather`` would
        then arrive twice and pile up unread there. This app publishes the same messages without.
        """
        app = getattr(self, "_publisher_app", None)
        if app is None:
            app = Celery("fleet-producer-publish", set_as_current=False)
            config = celery_config(self.settings)
            config.pop("result_backend", None)
            app.conf.update(config)
            self._publisher_app = app
        return app

    def gather(self, handles: Sequence[JobHandle], timeout: float | None = 60.0, *,
               return_exceptions: bool = False) -> list[Any]:
        """Wait for all ``handles``; return their typed results in the same order.

        ``timeout`` bounds the whole wait. With ``return_exceptions`` a failed, cancelled or
        unfinished job gives its ``FleetError`` (``JobFailedError``, ``JobCancelled``,
        ``JobTimeout``) in its place; otherwise the first such error in handle order is raised
        once all jobs have been waited for.
        """
        outcomes = {handle.id: outcome for handle, outcome in self.as_completed(handles, timeout)}
        ordered = [outcomes[handle.id] for handle in handles]
        if not return_exceptions:
            for outcome in ordered:
                if isinstance(outcome, BaseException):
                    raise outcome
        return ordered

    def as_completed(self, handles: Iterable[JobHandle], timeout: float | None = 60.0
                     ) -> Iterator[tuple[JobHandle, Any]]:
        """Yield ``(handle, outcome)`` for each job as it finishes, each job exactly once.

        ``outcome`` is the typed result or a ``FleetError``; jobs still unfinished when
        ``timeout`` (seconds, for the whole wait) runs out yield ``JobTimeout``.

        How: one pub/sub connection SUBSCRIBEs to the jobs' result channels (the Celery Redis
        backend publishes every stored state there), then one MGET picks up jobs that had
        finished before the subscription; after that results arrive pushed, none is polled.
        As a safety net against a dropped pub/sub connection, the still-pending keys are
        re-read with one MGET every ``RECHECK_S`` seconds.
        """
        collector = ResultCollector(self, handles)
        if not collector.pending:
            yield from collector.drain_ready()
            return
        deadline = None if timeout is None else time.monotonic() + timeout
        pubsub = self._redis.pubsub()
        try:
            channels = list(collector.pending)
            for start in range(0, len(channels), SUBSCRIBE_CHUNK):
                pubsub.subscribe(*channels[start:start + SUBSCRIBE_CHUNK])
            unconfirmed = len(channels)
            while unconfirmed:  # MGET only once Redis has registered every subscription
                message = pubsub.get_message(timeout=_remaining(deadline, RECHECK_S))
                if message is None:
                    if _remaining(deadline, 1.0) <= 0:
                        break
                    continue
                if message["type"] == "subscribe":
                    unconfirmed -= 1
                elif message["type"] == "message":
                    collector.feed(message["channel"], message["data"])
            collector.feed_many(self._mget(list(collector.pending)))
            yield from collector.drain_ready()
            next_check = time.monotonic() + RECHECK_S
            while collector.pending and _remaining(deadline, 1.0) > 0:
                message = pubsub.get_message(timeout=min(_remaining(deadline, RECHECK_S),
                                                         max(0.0, next_check - time.monotonic())))
                if message is not None and message["type"] == "message":
                    collector.feed(message["channel"], message["data"])
                elif message is None and time.monotonic() >= next_check:
                    collector.feed_many(self._mget(list(collector.pending)))
                    next_check = time.monotonic() + RECHECK_S
                yield from collector.drain_ready()
        finally:
            pubsub.close()
        yield from collector.drain_ready()
        yield from collector.time_out(timeout)

    def _mget(self, keys_: list[bytes]) -> list[tuple[bytes, bytes | None]]:
        values: list[bytes | None] = []
        for start in range(0, len(keys_), MGET_CHUNK):
            values.extend(self._redis.mget(keys_[start:start + MGET_CHUNK]))
        return list(zip(keys_, values))

    # --- results and control --------------------------------------------------------

    def _interpret(self, job_id: str, state: str, value: Any, kind: str | None) -> BaseModel:
        if state == "SUCCESS":
            result_cls = _RESULT_MODELS.get(kind or "")
            if result_cls is None:
                raise InvalidRequest(f"job {job_id} has no known kind; cannot type its result")
            return result_cls.model_validate(value)
        if state == "REVOKED":
            if _revoked_as_expired(value):
                raise JobExpired(f"job {job_id} passed its deadline before it started; it was not computed")
            raise JobCancelled(f"job {job_id} was cancelled")
        if isinstance(value, JobFailedError):
            raise value
        raise JobFailedError("internal", f"job {job_id} ended in {state}: {value!r}")

    def _cancel(self, job_id: str) -> None:
        self._redis.set(keys.cancel_flag(job_id), "1", ex=self.settings.result_expires_s)
        self.celery.control.revoke(job_id)


#: Redis commands buffered per pipelined publish (two per job: the task message and its sent event).
PUBLISH_BATCH_OPS = 2000
#: Channels per SUBSCRIBE command and keys per MGET when collecting many results.
SUBSCRIBE_CHUNK = 1000
MGET_CHUNK = 1000
#: While collecting, re-read still-pending results this often (s), in case pub/sub lost a message.
RECHECK_S = 5.0


def _job_record(kind: ModelKind | str, request: BaseModel, queue: str, submitted_at: float, *, task: str,
                priority: int, expires: datetime | None) -> dict[str, Any]:
    """The ``keys.job_record`` hash written for every submitted job.

    ``task``, ``priority``, ``expires`` and ``request`` let the delivery sweeper send the job again
    if its message is lost on the way to a worker; the worker drops ``request`` when the job starts.
    """
    return {"kind": ModelKind(kind).value if kind != "train" else kind, "model": getattr(request, "model", ""),
            "queue": queue, "submitted_at": submitted_at,
            "stream": "1" if getattr(request, "stream", False) else "0",
            "task": task, "priority": priority, "expires": expires.isoformat() if expires else "",
            "request": request.model_dump_json()}


def _record_jobs(pipe, records: dict[str, dict[str, Any]], expires_s: int) -> None:
    """Queue on ``pipe`` the job records of ``records`` (job id -> record) and their pending entries."""
    for job_id, record in records.items():
        pipe.hset(keys.job_record(job_id), mapping=record)
        pipe.expire(keys.job_record(job_id), expires_s)
    pipe.zadd(keys.PENDING, {job_id: record["submitted_at"] for job_id, record in records.items()})


def _revoked_as_expired(value: Any) -> bool:
    """Celery stores a REVOKED job's reason as ``TaskRevokedError(reason)``; "expired" means its deadline passed."""
    return "expired" in str(value)


def _remaining(deadline: float | None, cap: float) -> float:
    """Seconds left until ``deadline`` (monotonic), at most ``cap``; ``cap`` when there is no deadline."""
    return cap if deadline is None else max(0.0, min(cap, deadline - time.monotonic()))


class ResultCollector:
    """Bookkeeping shared by the sync and asyncio clients while they wait for many results.

    Knows which result channel (Celery's ``celery-task-meta-<id>`` key, on which the Redis
    backend also publishes) belongs to which job; decodes stored or published result
    metadata exactly as Celery does; turns a finished job into its typed result or its
    ``FleetError``. No I/O except one pipelined HMGET for handles whose kind is not known yet.
    """

    def __init__(self, client: FleetClient, handles: Iterable[Any]):
        self._client = client
        backend = client.celery.backend
        self._decode = backend.decode_result
        self.handles: dict[str, Any] = {}
        for handle in handles:
            self.handles.setdefault(handle.id, handle)
        self.kinds = {job_id: handle._kind for job_id, handle in self.handles.items()}
        unknown = [job_id for job_id, kind in self.kinds.items() if kind is None]
        if unknown:
            with client._redis.pipeline(transaction=False) as pipe:
                for job_id in unknown:
                    pipe.hget(keys.job_record(job_id), "kind")
                for job_id, raw in zip(unknown, pipe.execute()):
                    self.kinds[job_id] = raw.decode() if raw else None
        self.channels = {_as_bytes(backend.get_key_for_task(job_id)): job_id for job_id in self.handles}
        self.pending: set[bytes] = set(self.channels)
        self._ready: list[tuple[Any, Any]] = []

    def feed(self, channel: bytes | str, payload: bytes | str | None) -> None:
        """Take one stored or published result; keep it if it finishes a pending job."""
        channel = _as_bytes(channel)
        if payload is None or channel not in self.pending:
            return
        meta = self._decode(payload)
        state = meta.get("status")
        if state not in states.READY_STATES:
            return  # STARTED / PROGRESS / RETRY: not finished
        self.pending.discard(channel)
        job_id = self.channels[channel]
        try:
            outcome: Any = self._client._interpret(job_id, state, meta.get("result"), self.kinds.get(job_id))
        except FleetError as exc:
            outcome = exc
        self._ready.append((self.handles[job_id], outcome))

    def feed_many(self, pairs: Iterable[tuple[bytes, bytes | None]]) -> None:
        for channel, payload in pairs:
            self.feed(channel, payload)

    def drain_ready(self) -> list[tuple[Any, Any]]:
        ready, self._ready = self._ready, []
        return ready

    def time_out(self, timeout: float | None) -> list[tuple[Any, Any]]:
        """``JobTimeout`` for every job still pending (called once the wait is over)."""
        timed_out = [(self.handles[self.channels[channel]],
                      JobTimeout(f"job {self.channels[channel]} did not finish within {timeout} s"))
                     for channel in self.pending]
        self.pending.clear()
        return timed_out


def _as_bytes(value: bytes | str) -> bytes:
    return value if isinstance(value, bytes) else value.encode()


def _as_list(texts: Sequence[str] | str) -> Any:
    """A lone string is a common slip for a one-element list: refuse it rather than embed letters."""
    if isinstance(texts, str):
        raise InvalidRequest("texts must be a list of strings, not a single string",
                             [{"loc": ["texts"], "msg": "expected a list", "type": "list_type"}])
    return list(texts) if isinstance(texts, (list, tuple)) else texts
