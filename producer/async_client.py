"""The asyncio producer API: ``AsyncFleetClient``, the same methods as ``FleetClient``, awaitable.

For producers inside async web apps: no call blocks the event loop.

* Waiting for results, status, job records and cancel flags use ``redis.asyncio``. All waits
  in one client share one pub/sub connection, read by one background task that hands each
  published result to whoever awaits it; ``await handle.result()`` costs no connection and no
  polling of its own.
* Publishing goes through kombu (Celery's message format, routing, priorities and trace
  hooks), which is synchronous: it runs on one dedicated thread (``run_in_executor``), so the
  loop never waits on a socket. ``embed_many`` / ``submit_many`` publish many jobs there in
  pipelined batches, as ``FleetClient.submit_many`` does.

Use ``async with AsyncFleetClient(url) as client: ...`` (or ``await client.close()``).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import redis.asyncio as aioredis
from pydantic import BaseModel

from producer import keys
from producer.admission import claim_idempotency_key
from producer.celery_config import PRIORITY_DEFAULT
from producer.client import (
    MGET_CHUNK,
    RECHECK_S,
    SUBMIT_OPTIONS,
    SUBSCRIBE_CHUNK,
    FleetClient,
    ResultCollector,
    _as_list,
    validate_request,
)
from producer.contract import (
    CELERY_STATE_TO_STATUS,
    ClassifyRequest,
    EmbedRequest,
    GenerateRequest,
    JobStatus,
    ModelKind,
)
from producer.contract.inference import EmbedEncoding
from producer.errors import FleetError, InvalidRequest, JobTimeout
from producer.redis_connection import async_redis_client
from producer.settings import FleetSettings

__all__ = ["AsyncFleetClient", "AsyncJobHandle"]


class AsyncJobHandle:
    """A submitted job, followed without blocking the event loop."""

    def __init__(self, client: AsyncFleetClient, job_id: str, kind: str | None = None):
        self._client = client
        self.id = job_id
        self._kind = kind

    def __repr__(self) -> str:
        return f"AsyncJobHandle(id={self.id!r}, kind={self._kind!r})"

    @property
    def kind(self) -> str | None:
        """The job's kind if known locally (always, for handles this client submitted)."""
        return self._kind

    async def result(self, timeout: float | None = 60.0) -> BaseModel:
        """Wait up to ``timeout`` seconds (None: forever); return the typed result.

        Raises ``JobFailedError`` (with ``.code``), ``JobCancelled`` or ``JobTimeout`` as
        ``JobHandle.result`` does.
        """
        async for _, outcome in self._client.as_completed([self], timeout):
            if isinstance(outcome, BaseException):
                raise outcome
            return outcome
        raise JobTimeout(f"job {self.id} did not finish within {timeout} s")  # pragma: no cover

    async def status(self) -> JobStatus:
        """Current status; ``UNKNOWN`` when Redis holds neither a record nor a result for the id."""
        return await self._client._status(self.id)

    async def cancel(self) -> None:
        """Cancel the job: a queued job never runs, a running one stops at its next safe point."""
        await self._client._cancel(self.id)

    async def stream(self, timeout: float | None = 60.0) -> AsyncIterator[str]:
        """Yield generated text pieces as the worker produces them (``generate(..., stream=True)``).

        Blocking XREAD on the job's Redis stream (no polling); ``timeout`` bounds the wait for
        each next piece. After the last piece the result is checked, so a failed or cancelled
        job raises as ``result()`` would.
        """
        redis_ = self._client._redis
        if await redis_.hget(keys.job_record(self.id), "stream") != b"1":
            yield (await self.result(timeout=timeout)).text  # not a streaming job: the whole text
            return
        last_id = "0-0"
        block_ms = 0 if timeout is None else max(1, int(timeout * 1000))
        while True:
            reply = await redis_.xread({keys.token_stream(self.id): last_id}, count=64, block=block_ms)
            if not reply:
                if (await self.status()).finished:
                    await self.result(timeout=0.1)
                    return
                raise JobTimeout(f"no streamed output from job {self.id} within {timeout} s")
            for entry_id, fields in reply[0][1]:
                last_id = entry_id
                if b"done" in fields:
                    await self.result(timeout=timeout)
                    return
                yield fields[b"piece"].decode()


class AsyncFleetClient:
    """Submit jobs to a Fleet and follow them from asyncio code.

    ``redis_url`` defaults to ``$REDIS_URL``, else ``redis://127.0.0.1:6379/0``. Validation
    happens in the calling coroutine, before anything is sent.
    """

    def __init__(self, redis_url: str | None = None, *, settings: FleetSettings | None = None):
        self._sync = FleetClient(redis_url, settings=settings)  # validation, catalog, kombu publishing
        self.settings = self._sync.settings
        self._redis = async_redis_client(self.settings)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fleet-publish")
        self._results = _ResultRouter(self._redis)
        self._closed = False

    async def __aenter__(self) -> AsyncFleetClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Stop the result reader, release Redis connections and the publishing thread."""
        if self._closed:
            return
        self._closed = True
        await self._results.close()
        await self._redis.aclose()
        await self._in_publisher_thread(self._sync.close)
        self._executor.shutdown(wait=False)

    # --- submitting ---------------------------------------------------------------------

    async def embed(self, texts: Sequence[str], model: str = "minilm", *, normalize: bool = True,
                    encoding: EmbedEncoding = "float", priority: int = PRIORITY_DEFAULT,
                    **options: Any) -> AsyncJobHandle:
        """Submit an embedding job for ``texts``; see ``EmbedRequest`` for limits.

        ``encoding`` (``"float"`` or ``"base64"``) and ``options`` (``deadline_s``, ``idempotency_key``,
        ``block_s``) as for ``FleetClient.embed``.
        """
        request = validate_request(EmbedRequest, {"texts": _as_list(texts), "model": model, "normalize": normalize,
                                                  "encoding": encoding})
        return await self._submit_one(ModelKind.EMBED, request, priority, **options)

    async def classify(self, texts: Sequence[str] | None = None, model: str | None = None, *,
                       inputs: Sequence[Sequence[float]] | None = None, top_k: int = 1,
                       priority: int = PRIORITY_DEFAULT, **options: Any) -> AsyncJobHandle:
        """Submit a classification job for ``texts`` or ``inputs`` (as ``FleetClient.classify``)."""
        fields: dict[str, Any] = {"model": model, "top_k": top_k}
        if texts is not None:
            fields["texts"] = _as_list(texts)
        if inputs is not None:
            fields["inputs"] = [list(vector) for vector in inputs]
        request = validate_request(ClassifyRequest, fields)
        return await self._submit_one(ModelKind.CLASSIFY, request, priority, **options)

    async def generate(self, prompt: str, model: str, *, priority: int = PRIORITY_DEFAULT,
                       **options: Any) -> AsyncJobHandle:
        """Submit a generation job; ``options`` are ``GenerateRequest`` fields (max_new_tokens, ...)
        plus the submission options ``deadline_s``, ``idempotency_key``, ``block_s``."""
        submit = {name: options.pop(name) for name in SUBMIT_OPTIONS if name in options}
        request = validate_request(GenerateRequest, {"prompt": prompt, "model": model, **options})
        return await self._submit_one(ModelKind.GENERATE, request, priority, **submit)

    async def _submit_one(self, kind: ModelKind, request: BaseModel, priority: int, *,
                          deadline_s: float | None = None, idempotency_key: str | None = None,
                          block_s: float = 0.0) -> AsyncJobHandle:
        def publish() -> AsyncJobHandle:
            job_id = str(uuid.uuid4())
            if idempotency_key is not None:
                existing = claim_idempotency_key(self._sync._redis, idempotency_key, job_id,
                                                 self.settings.idempotency_window_s)
                if existing is not None:
                    return AsyncJobHandle(self, existing)
            handle = self._sync.submit_many(kind, [request], priority=priority, deadline_s=deadline_s,
                                            block_s=block_s, job_ids=[job_id])[0]
            return AsyncJobHandle(self, handle.id, handle._kind)

        return await self._in_publisher_thread(publish)

    async def embed_many(self, texts_per_job: Iterable[Sequence[str]], model: str = "minilm", *,
                         normalize: bool = True, encoding: EmbedEncoding = "float", priority: int = PRIORITY_DEFAULT,
                         **options: Any) -> list[AsyncJobHandle]:
        """Submit one embedding job per entry of ``texts_per_job``; handles in order (see ``FleetClient``)."""
        requests = []
        for index, texts in enumerate(texts_per_job):
            try:
                requests.append(validate_request(EmbedRequest, {"texts": _as_list(texts), "model": model,
                                                                "normalize": normalize, "encoding": encoding}))
            except InvalidRequest as exc:
                raise type(exc)(f"job {index}: {exc}", exc.errors) from None
        return await self.submit_many(ModelKind.EMBED, requests, priority=priority, **options)

    async def submit_many(self, kind: ModelKind | str, requests: Sequence[BaseModel | dict[str, Any]], *,
                          priority: int = PRIORITY_DEFAULT, **options: Any) -> list[AsyncJobHandle]:
        """Submit many jobs of one kind in pipelined batches, on the publishing thread; handles in order.

        ``options``: ``deadline_s``, ``block_s`` (as ``FleetClient.submit_many``)."""
        handles = await self._in_publisher_thread(self._sync.submit_many, kind, list(requests), priority=priority,
                                                  **options)
        return [AsyncJobHandle(self, handle.id, handle._kind) for handle in handles]

    def job(self, job_id: str) -> AsyncJobHandle:
        """The handle of an existing job, e.g. one submitted by another process."""
        return AsyncJobHandle(self, job_id)

    # --- collecting ---------------------------------------------------------------------

    async def gather(self, handles: Sequence[AsyncJobHandle], timeout: float | None = 60.0, *,
                     return_exceptions: bool = False) -> list[Any]:
        """Wait for all ``handles``; typed results in the same order (errors as in ``FleetClient.gather``)."""
        outcomes = {handle.id: outcome async for handle, outcome in self.as_completed(handles, timeout)}
        ordered = [outcomes[handle.id] for handle in handles]
        if not return_exceptions:
            for outcome in ordered:
                if isinstance(outcome, BaseException):
                    raise outcome
        return ordered

    async def as_completed(self, handles: Iterable[AsyncJobHandle], timeout: float | None = 60.0
                           ) -> AsyncIterator[tuple[AsyncJobHandle, Any]]:
        """Yield ``(handle, outcome)`` as each job finishes, each exactly once (``JobTimeout`` at the deadline)."""
        handles = list(handles)
        collector = await asyncio.to_thread(ResultCollector, self._sync, handles) if any(
            h._kind is None for h in handles) else ResultCollector(self._sync, handles)
        deadline = None if timeout is None else time.monotonic() + timeout
        inbox: asyncio.Queue = asyncio.Queue()
        channels = list(collector.pending)
        try:
            await self._results.watch(channels, inbox)
            values = []
            for start in range(0, len(channels), MGET_CHUNK):
                values.extend(await self._redis.mget(channels[start:start + MGET_CHUNK]))
            collector.feed_many(zip(channels, values))
            for item in collector.drain_ready():
                yield item
            while collector.pending:
                wait = RECHECK_S if deadline is None else min(RECHECK_S, deadline - time.monotonic())
                if wait <= 0:
                    break
                try:
                    channel, payload = await asyncio.wait_for(inbox.get(), wait)
                    collector.feed(channel, payload)
                except TimeoutError:  # safety net: re-read what is still pending, in one MGET
                    pending = list(collector.pending)
                    collector.feed_many(zip(pending, await self._redis.mget(pending)))
                for item in collector.drain_ready():
                    yield item
        finally:
            await self._results.unwatch(channels, inbox)
        for item in collector.time_out(timeout):
            yield item

    # --- status and control -------------------------------------------------------------

    async def _status(self, job_id: str) -> JobStatus:
        key = self._sync.celery.backend.get_key_for_task(job_id)
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.get(key)
            pipe.exists(keys.job_record(job_id))
            raw, has_record = await pipe.execute()
        state = self._sync.celery.backend.decode_result(raw).get("status", "PENDING") if raw else "PENDING"
        if state == "PENDING" and not has_record:
            return JobStatus.UNKNOWN
        return CELERY_STATE_TO_STATUS.get(state, JobStatus.UNKNOWN)

    async def _cancel(self, job_id: str) -> None:
        await self._redis.set(keys.cancel_flag(job_id), "1", ex=self.settings.result_expires_s)
        await self._in_publisher_thread(self._sync.celery.control.revoke, job_id)

    async def _in_publisher_thread(self, function, *args, **kwargs):
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, lambda: function(*args, **kwargs))


#: How long ``watch`` waits for Redis to confirm its subscriptions before relying on re-reads (s).
SUBSCRIBE_CONFIRM_S = 2.0


class _ResultRouter:
    """One pub/sub connection per client and one task reading it.

    ``watch(channels, inbox)`` subscribes and returns once Redis has confirmed every
    subscription (so that a following MGET cannot miss a result published in between);
    published messages on a channel go to every inbox watching it.
    """

    def __init__(self, redis_: aioredis.Redis):
        self._redis = redis_
        self._pubsub = None
        self._reader: asyncio.Task | None = None
        self._watchers: dict[bytes, set[asyncio.Queue]] = {}
        self._confirmations: dict[bytes, list[asyncio.Future]] = {}
        self._subscribe_lock = asyncio.Lock()

    async def watch(self, channels: list[bytes], inbox: asyncio.Queue) -> None:
        if not channels:
            return
        loop = asyncio.get_running_loop()
        if self._pubsub is None:
            self._pubsub = self._redis.pubsub()
        waits = []
        for channel in channels:
            self._watchers.setdefault(channel, set()).add(inbox)
            future = loop.create_future()
            self._confirmations.setdefault(channel, []).append(future)
            waits.append(future)
        # One subscriber at a time: redis-py's asyncio PubSub opens its connection on the first
        # SUBSCRIBE, and concurrent first calls each open one; confirmations and results sent
        # to all but the last are never read.
        async with self._subscribe_lock:
            for start in range(0, len(channels), SUBSCRIBE_CHUNK):
                await self._pubsub.subscribe(*channels[start:start + SUBSCRIBE_CHUNK])
        if self._reader is None or self._reader.done():
            self._reader = asyncio.create_task(self._read(), name="fleet-results")
        try:
            await asyncio.wait_for(asyncio.gather(*waits), SUBSCRIBE_CONFIRM_S)
        except TimeoutError:
            # A confirmation that never came must not hang the caller: it goes on with its MGET
            # and the periodic re-read, which find results whatever pub/sub delivered.
            for channel, future in zip(channels, waits):
                waiting = self._confirmations.get(channel)
                if waiting and future in waiting:
                    waiting.remove(future)
                    if not waiting:
                        del self._confirmations[channel]

    async def unwatch(self, channels: list[bytes], inbox: asyncio.Queue) -> None:
        idle = []
        for channel in channels:
            inboxes = self._watchers.get(channel)
            if inboxes is None:
                continue
            inboxes.discard(inbox)
            if not inboxes:
                del self._watchers[channel]
                idle.append(channel)
        if idle and self._pubsub is not None:
            try:
                for start in range(0, len(idle), SUBSCRIBE_CHUNK):
                    await self._pubsub.unsubscribe(*idle[start:start + SUBSCRIBE_CHUNK])
            except Exception:  # noqa: BLE001 - the connection is gone; nothing left to unsubscribe
                pass

    async def _read(self) -> None:
        try:
            while True:
                message = await self._pubsub.get_message(timeout=1.0)
                if message is None:
                    continue
                kind, channel = message["type"], message["channel"]
                if kind == "subscribe":
                    waiting = self._confirmations.get(channel)
                    if waiting:
                        future = waiting.pop(0)
                        if not waiting:
                            del self._confirmations[channel]
                        if not future.done():
                            future.set_result(None)
                elif kind == "message":
                    for inbox in self._watchers.get(channel, ()):
                        inbox.put_nowait((channel, message["data"]))
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # hand the failure to everyone waiting on a subscription
            for waiting in self._confirmations.values():
                for future in waiting:
                    if not future.done():
                        future.set_exception(FleetError(f"result subscription failed: {exc}"))
            self._confirmations.clear()
            raise

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            try:
                await self._reader
            except (asyncio.CancelledError, Exception):  # noqa: BLE001 - closing: what the reader raised no longer matters
                pass
        if self._pubsub is not None:
            await self._pubsub.aclose()
