"""The synchronous producer API: ``FleetClient`` submits jobs, ``JobHandle`` follows one.

This module holds only the blocking I/O. What a call means (requests, options, job records,
statuses, results, waits) is ``producer/core/``, shared with ``AsyncFleetClient``; every job is
published by ``producer/publishing.py``. Results arrive on one long-lived pattern subscription
per client, started at its first wait and read by one daemon thread (``_Listener``); from then
on, waiting for a result of a job this client submitted sends no Redis command. Nothing here
imports torch or worker code.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, cast

import redis
from celery import Celery
from pydantic import BaseModel

from producer import keys, telemetry
from producer.celery_config import PRIORITY_DEFAULT, celery_config
from producer.contract import GenerateResult, JobStatus, ModelKind, TrainProgress
from producer.contract.inference import EmbedEncoding
from producer.core.jobs import connection_name, new_client_prefix, result_key
from producer.core.options import SubmitOptions, parse_options
from producer.core.requests import (
    TRAIN_KIND,
    build_many,
    build_request,
    check_kind,
    classify_fields,
    embed_fields,
    train_fields,
    validate_request,
)
from producer.core.results import (
    REASON_CANCELLED,
    REASON_EXPIRED,
    decode_meta,
    progress_of,
    status_of,
    unstarted_marker,
)
from producer.core.router import KEYS_PER_COMMAND, RECONNECT_PAUSE_S, SUBSCRIBE_CONFIRM_S, ResultRouter
from producer.core.waits import (
    RECORD_FIELDS,
    HandleBase,
    JobInfo,
    StreamCursor,
    Wait,
    ordered_outcomes,
    raise_or_return,
)
from producer.errors import FleetRedisError
from producer.model_control import ModelControl
from producer.publishing import Publisher
from producer.redis_connection import redis_client, redis_errors, wait_client
from producer.scripts import SETTLE_UNSTARTED, settle_call
from producer.settings import FleetSettings, client_settings

__all__ = ["FleetClient", "JobHandle", "validate_request"]

#: The listener thread's longest block on its connection (s), so that ``close`` stops it promptly.
LISTEN_POLL_S = 0.5


class JobHandle(HandleBase):
    """A submitted job. Cheap to create; ``status``, ``progress`` and ``cancel`` ask Redis afresh."""

    _client: FleetClient

    @property
    def kind(self) -> str | None:
        """The job's kind (``embed``, ...), read from its job record when not known locally."""
        return self.info().kind

    def info(self) -> JobInfo:
        """What the client knows about the job (read from its job record once, if it was not submitted here)."""
        if self._info is None:
            self._client._describe([self])
        return self._info  # type: ignore[return-value]

    def status(self) -> JobStatus:
        """Current status. ``UNKNOWN`` when Redis holds neither a record nor a result for the id.

        A queued job past its deadline is marked ``EXPIRED`` here and then (it will not run).
        """
        return self._client._status(self)

    def result(self, timeout: float | None = 60.0) -> BaseModel:
        """Wait up to ``timeout`` seconds (None: forever) and return the typed result.

        Raises ``JobFailedError`` (with ``.code``), ``JobCancelledError``, ``JobExpiredError`` (at the
        job's deadline if no worker started it) or ``JobTimeoutError``.
        """
        return raise_or_return(list(self._client.as_completed([self], timeout)))

    def cancel(self) -> None:
        """Cancel the job: a queued job never runs (and reports ``CANCELLED`` at once), a running one
        stops at its next safe point."""
        self._client._cancel(self)

    def progress(self) -> TrainProgress | None:
        """The latest progress a running training job reported, or None (not started, or not training)."""
        with redis_errors(self._client.settings.redis_url):
            return progress_of(decode_meta(self._client._redis.get(result_key(self.id))))

    def stream(self, timeout: float | None = 60.0) -> Iterator[str]:
        """Yield generated text pieces as the worker produces them (``generate(..., stream=True)``).

        Blocking XREAD on the job's Redis stream (no polling). ``timeout`` bounds the wait for
        each next piece, in seconds (``JobTimeoutError``). After the last piece the job's result is
        checked, so a failed, cancelled or expired job raises as ``result()`` would.
        """
        info = self.info()
        if not info.streams:
            yield cast(GenerateResult, self.result(timeout=timeout)).text  # not streaming: the whole text at once
            return
        cursor = StreamCursor(self.id, info, timeout, time.monotonic())
        while not cursor.ended:
            reply = self._client._read_stream(self.id, cursor.last_id, cursor.block_ms(time.monotonic()))
            yield from cursor.feed(reply, time.monotonic())
            if cursor.settle_due(time.time()):
                self._client._expire_in_wait(self.id)
            if not cursor.ended and not reply and cursor.timed_out(time.monotonic()):
                if not self._client._finished(self.id):
                    raise cursor.timeout_error()
                break
        self.result(timeout=timeout)


class FleetClient:
    """Submit jobs to a Fleet and follow them.

    ``redis_url`` defaults to ``$REDIS_URL``, else ``redis://127.0.0.1:6379/0``. Validation
    happens here, before anything is enqueued. Safe to share between threads.
    """

    def __init__(self, redis_url: str | None = None, *, settings: FleetSettings | None = None):
        self.settings = settings = client_settings(redis_url, settings)
        prefix = new_client_prefix()
        #: The name its Redis connections carry (``CLIENT LIST``): this, and this plus ``-wait``.
        self.name = connection_name(prefix)
        self._redis = redis_client(settings, client_name=self.name)
        self._publisher = Publisher(settings, self._redis, prefix)
        self._router = ResultRouter(prefix)
        self._listener = _Listener(wait_client(settings, client_name=f"{self.name}-wait"), self._router,
                                   settings.redis_url)
        self._settle_script = self._redis.register_script(SETTLE_UNSTARTED)
        self._models = ModelControl(self._publisher, self._redis)
        self._control_app: Celery | None = None
        telemetry.setup_producer()  # traces task publishing; a no-op unless an OTLP endpoint is set

    @property
    def celery(self) -> Celery:
        """A Celery app with Fleet's wire settings and the result backend, for what the client does not
        wrap (``control.ping``, raw ``send_task``). Created on first use."""
        if self._control_app is None:
            self._control_app = Celery("fleet-producer", set_as_current=False)
            self._control_app.conf.update(celery_config(self.settings))
        return self._control_app

    def close(self) -> None:
        """Stop the result listener and release Redis connections."""
        self._listener.stop()
        self._redis.close()
        self._publisher.close()
        if self._control_app is not None:
            self._control_app.close()

    def __enter__(self) -> FleetClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # --- submitting -----------------------------------------------------------------------

    def embed(self, texts: Sequence[str], model: str = "minilm", *, normalize: bool = True,
              encoding: EmbedEncoding = "float", priority: int = PRIORITY_DEFAULT, **options: Any) -> JobHandle:
        """Submit an embedding job for ``texts``; see ``EmbedRequest`` for limits.

        ``encoding``: ``"float"`` (result ``vectors``) or ``"base64"`` (result ``vectors_b64``: float32
        bytes, much cheaper for big jobs); ``EmbedResult.float_vectors()`` reads either.
        ``options``: the submission options of ``SubmitOptions`` (``deadline_s``, ``idempotency_key``, ...).
        """
        return self._submit_one(ModelKind.EMBED.value, embed_fields(texts, model, normalize, encoding),
                                {"priority": priority, **options})

    def classify(self, texts: Sequence[str] | None = None, model: str | None = None, *,
                 inputs: Sequence[Sequence[float]] | None = None, top_k: int = 1,
                 priority: int = PRIORITY_DEFAULT, **options: Any) -> JobHandle:
        """Submit a classification job for ``texts`` (text classifiers) or ``inputs`` (feature vectors).

        The result lists ``top_k`` labels with softmax scores per input.
        """
        return self._submit_one(ModelKind.CLASSIFY.value, classify_fields(texts, model, inputs, top_k),
                                {"priority": priority, **options})

    def generate(self, prompt: str, model: str, *, priority: int = PRIORITY_DEFAULT, **fields: Any) -> JobHandle:
        """Submit a generation job; ``fields`` are ``GenerateRequest`` fields (``max_new_tokens``, ...)
        and submission options (``SubmitOptions``)."""
        return self._submit_one(ModelKind.GENERATE.value, {"prompt": prompt, "model": model},
                                {"priority": priority, **fields})

    def train(self, kind: str, dataset: str | None = None, **fields: Any) -> JobHandle:
        """Submit a training job; ``fields`` are ``TrainRequest`` fields (``epochs``, ``seed``, ...)
        and submission options. Unset fields take the kind's defaults."""
        return self._submit_one(TRAIN_KIND, train_fields(kind, dataset), fields)

    def embed_many(self, texts_per_job: Iterable[Sequence[str]], model: str = "minilm", *, normalize: bool = True,
                   encoding: EmbedEncoding = "float", priority: int = PRIORITY_DEFAULT,
                   **options: Any) -> list[JobHandle]:
        """Submit one embedding job per entry of ``texts_per_job``; return their handles in order.

        Every request is validated before anything is sent (one bad entry raises
        ``InvalidRequestError`` naming its index, and nothing is enqueued). ``options`` as for
        ``submit_many``.
        """
        requests = build_many(ModelKind.EMBED.value, texts_per_job,
                              lambda texts: embed_fields(texts, model, normalize, encoding))
        return self.submit_many(ModelKind.EMBED, requests, priority=priority, **options)

    def submit_many(self, kind: ModelKind | str, requests: Sequence[BaseModel | dict[str, Any]], *,
                    priority: int = PRIORITY_DEFAULT, **options: Any) -> list[JobHandle]:
        """Submit many jobs of one ``kind`` (requests as contract models or plain dicts); handles in order.

        All jobs are recorded in one round trip and their messages published in pipelined batches:
        a constant number of round trips, not one per job (``producer/publishing.py``). ``options``:
        ``deadline_s``, ``block_s``, ``result_ttl_s``, ``wait_for_worker``, ``job_ids`` (one per request).
        """
        kind = check_kind(kind)
        checked = build_many(kind, requests)
        return self._publish(kind, checked, parse_options({"priority": priority, **options}, bulk=True))

    def job(self, job_id: str) -> JobHandle:
        """Return the handle of an existing job, e.g. one submitted by another process."""
        return JobHandle(self, job_id)

    @property
    def models(self) -> ModelControl:
        """The fleet's models: ``client.models()`` reads the catalog now (kind, queue, whether a live worker
        serves it, when one last did); ``client.models.load(name)``, ``.unload(name)`` and
        ``.switch(name, to=version)`` change what running workers serve (``producer/model_control.py``)."""
        return self._models

    def _submit_one(self, kind: str, fields: dict[str, Any], extra: dict[str, Any]) -> JobHandle:
        request, options = build_request(kind, fields, extra)
        return self._publish(kind, [request], options)[0]

    def _publish(self, kind: str, requests: list[BaseModel], options: SubmitOptions) -> list[JobHandle]:
        coverage = self._router.coverage()  # None until the client first waits: then results are read once
        return [JobHandle(self, item.job_id, item.info(coverage))
                for item in self._publisher.publish(kind, requests, options)]

    # --- collecting -----------------------------------------------------------------------

    def gather(self, handles: Sequence[JobHandle], timeout: float | None = 60.0, *,
               return_exceptions: bool = False) -> list[Any]:
        """Wait for all ``handles``; return their typed results in the same order.

        ``timeout`` bounds the whole wait. With ``return_exceptions`` a failed, cancelled, expired or
        unfinished job gives its ``FleetError`` in its place; otherwise the first such error in handle
        order is raised once all jobs have been waited for.
        """
        outcomes = {handle.id: outcome for handle, outcome in self.as_completed(handles, timeout)}
        return ordered_outcomes(handles, outcomes, return_exceptions)

    def as_completed(self, handles: Iterable[JobHandle], timeout: float | None = 60.0
                     ) -> Iterator[tuple[JobHandle, Any]]:
        """Yield ``(handle, outcome)`` for each job as it finishes, each job exactly once.

        ``outcome`` is the typed result or a ``FleetError``; jobs still unfinished when ``timeout``
        (seconds, for the whole wait) runs out yield ``JobTimeoutError``. Results are pushed on the
        client's subscription; keys are read only for jobs it may have missed (``core/router.py``).
        """
        handles = list(handles)
        self._describe([handle for handle in handles if handle._info is None])
        wait = Wait(handles, {handle.id: handle._info or JobInfo() for handle in handles}, timeout, time.monotonic())
        inbox: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()

        def deliver(job_id: str, meta: Any) -> None:
            inbox.put((job_id, meta))

        self._listener.ensure_started()
        plan = self._router.watch(wait.waits(), deliver)
        try:
            for job_id, meta in plan.ready:
                wait.accept(job_id, meta)
            self._listener.subscribe(plan.subscribe)
            wait.accept_read(self._read_results(plan.read_now))
            while True:
                step = wait.step(time.time(), time.monotonic())
                yield from step.emit
                for job_id in step.settle:
                    wait.accept(job_id, decode_meta(self._expire_in_wait(job_id)))
                wait.accept_read(self._read_results(step.read))
                if step.done:
                    break
                for job_id, meta in _take(inbox, step.pause):
                    wait.accept(job_id, meta)
        finally:
            self._listener.unsubscribe(self._router.unwatch(wait.handles, deliver))
        yield from wait.finish()

    # --- Redis I/O ------------------------------------------------------------------------

    def _describe(self, handles: list[JobHandle]) -> None:
        """Fill in ``info`` of handles this client did not submit, from their job records (one round trip)."""
        if not handles:
            return
        with redis_errors(self.settings.redis_url), self._redis.pipeline(transaction=False) as pipe:
            for handle in handles:
                pipe.hmget(keys.job_record(handle.id), RECORD_FIELDS)
            for handle, values in zip(handles, pipe.execute()):
                handle._info = JobInfo.from_record(values)

    def _read_results(self, job_ids: list[str]) -> list[tuple[str, bytes | None]]:
        """The stored results of ``job_ids`` (MGET in chunks); none on a Redis error (the wait goes on)."""
        pairs: list[tuple[str, Any]] = []
        try:
            for start in range(0, len(job_ids), KEYS_PER_COMMAND):
                chunk = job_ids[start:start + KEYS_PER_COMMAND]
                pairs.extend(zip(chunk, self._listener.redis.mget([result_key(job_id) for job_id in chunk])))
        except redis.RedisError:
            pass  # a wait never fails on Redis: it ends at its timeout, and re-reads meanwhile
        return pairs

    def _read_stream(self, job_id: str, last_id: str, block_ms: int) -> list[Any]:
        """The next entries of a token stream; none on a Redis error (after ``block_ms``: the wait goes on)."""
        try:
            reply: Any = self._listener.redis.xread({keys.token_stream(job_id): last_id}, count=64, block=block_ms)
        except redis.RedisError:
            time.sleep(block_ms / 1000)
            return []
        return reply[0][1] if reply else []

    def _finished(self, job_id: str) -> bool:
        """Whether a final result is stored for the job (False when Redis does not answer)."""
        pairs = self._read_results([job_id])
        return any(meta is not None and meta.ready for meta in (decode_meta(payload) for _, payload in pairs))

    def _expire_in_wait(self, job_id: str) -> bytes | None:
        """``_settle`` a job whose deadline passed while someone waits for it; None when Redis does not answer
        (the wait goes on: a worker stores the same result when it takes the job)."""
        try:
            return self._settle(job_id, REASON_EXPIRED)
        except FleetRedisError:
            return None

    def _status(self, handle: JobHandle) -> JobStatus:
        with redis_errors(self.settings.redis_url), self._redis.pipeline(transaction=False) as pipe:
            pipe.get(result_key(handle.id))
            pipe.hmget(keys.job_record(handle.id), RECORD_FIELDS)
            raw, record = pipe.execute()
        info = JobInfo.from_record(record)
        if handle._info is None:
            handle._info = info
        meta = decode_meta(raw)
        if meta is None and info.expires_at is not None and time.time() >= info.expires_at:
            meta = decode_meta(self._settle(handle.id, REASON_EXPIRED))
        return status_of(meta, has_record=info.kind is not None)

    def _settle(self, job_id: str, reason: str) -> bytes | None:
        """Store the REVOKED marker of a job no worker started (``scripts.SETTLE_UNSTARTED``); return what is stored."""
        call_keys, args = settle_call(job_id, unstarted_marker(job_id, reason, time.time()),
                                      self.settings.result_expires_s, reason)
        with redis_errors(self.settings.redis_url):
            stored: bytes | None = self._settle_script(keys=call_keys, args=args)  # redis-py: Script returns Any
        return stored

    def _cancel(self, handle: JobHandle) -> None:
        with redis_errors(self.settings.redis_url):
            self._redis.set(keys.cancel_flag(handle.id), "1", ex=self.settings.result_expires_s)
        self._settle(handle.id, REASON_CANCELLED)
        with redis_errors(self.settings.redis_url):
            self._publisher.app.control.revoke(handle.id)


def _take(inbox: queue.SimpleQueue[tuple[str, Any]], timeout: float) -> list[tuple[str, Any]]:
    """What the inbox holds, once it holds anything (blocking up to ``timeout`` seconds for the first)."""
    try:
        items = [inbox.get(timeout=timeout)]
    except queue.Empty:
        return []
    while True:
        try:
            items.append(inbox.get_nowait())
        except queue.Empty:
            return items


class _Listener:
    """The client's one result subscription, read by one daemon thread that feeds the router.

    Started at the client's first wait; per-job channels (``subscribe``) ride on the same connection.
    """

    def __init__(self, redis_: redis.Redis, router: ResultRouter, url: str):
        self.redis = redis_
        self._router = router
        self._url = url
        self._pubsub: Any = None
        self._thread: threading.Thread | None = None
        self._stopped = threading.Event()
        self._start_lock = threading.Lock()
        self._write_lock = threading.Lock()

    def ensure_started(self) -> None:
        """Subscribe (once) and wait for Redis to confirm, so that nothing published later is missed."""
        with self._start_lock:
            if self._thread is not None:
                return
            pubsub = self.redis.pubsub()
            try:
                with redis_errors(self._url):
                    pubsub.psubscribe(self._router.pattern)
                    give_up_at = time.monotonic() + SUBSCRIBE_CONFIRM_S
                    while (message := pubsub.get_message(timeout=max(0.0, give_up_at - time.monotonic()))) is None \
                            or message["type"] != "psubscribe":
                        if time.monotonic() >= give_up_at:
                            raise redis.TimeoutError(f"no confirmation of PSUBSCRIBE in {SUBSCRIBE_CONFIRM_S} s")
            except BaseException:
                pubsub.close()
                raise
            self._router.on_pattern_confirmed()
            self._pubsub = pubsub
            self._thread = threading.Thread(target=self._run, name="fleet-results", daemon=True)
            self._thread.start()

    def subscribe(self, job_ids: list[str]) -> None:
        if job_ids:
            self.ensure_started()
            self._write(self._pubsub.subscribe, job_ids)

    def unsubscribe(self, job_ids: list[str]) -> None:
        if job_ids and self._pubsub is not None:
            self._write(self._pubsub.unsubscribe, job_ids)

    def _write(self, command: Any, job_ids: list[str]) -> None:
        try:
            with self._write_lock:
                for start in range(0, len(job_ids), KEYS_PER_COMMAND):
                    command(*(result_key(job_id) for job_id in job_ids[start:start + KEYS_PER_COMMAND]))
        except redis.RedisError:
            pass  # the connection is being re-established; redis-py subscribes again on reconnect

    def stop(self) -> None:
        self._stopped.set()
        if self._thread is not None:
            self._thread.join(timeout=2 * LISTEN_POLL_S + 1)
        if self._pubsub is not None:
            self._pubsub.close()
        self.redis.close()

    def _run(self) -> None:
        while not self._stopped.is_set():
            try:
                message = self._pubsub.get_message(timeout=LISTEN_POLL_S)
                if message is not None:
                    self._handle(message)
            except Exception:  # noqa: BLE001 - the connection failed: redis-py reconnects and resubscribes
                self._router.on_connection_lost()
                self._stopped.wait(RECONNECT_PAUSE_S)

    def _handle(self, message: dict[str, Any]) -> None:
        kind = message["type"]
        if kind in ("pmessage", "message"):
            self._router.on_message(message["channel"], message["data"])
        elif kind == "psubscribe":
            self._read(self._router.on_pattern_confirmed())
        elif kind == "subscribe":
            self._read(self._router.on_channel_confirmed(message["channel"]))

    def _read(self, job_ids: list[str]) -> None:
        for start in range(0, len(job_ids), KEYS_PER_COMMAND):
            chunk = job_ids[start:start + KEYS_PER_COMMAND]
            values: list[Any] = self.redis.mget([result_key(job_id) for job_id in chunk])
            self._router.on_read(zip(chunk, values))
