"""The asyncio producer API: ``AsyncFleetClient``, the calls of ``FleetClient``, awaitable.

For producers inside async web apps: no call blocks the event loop. This module holds only
the asyncio I/O; what each call means is ``producer/core/``, shared with ``FleetClient``.

* Waiting uses ``redis.asyncio``. Results arrive on the client's one pattern subscription
  (started at its first wait), read by one background task; from then on ``await handle.result()``
  for a job this client submitted sends no Redis command. Every other command (reads of results
  the push may have missed, status, streams) takes one of ``FLEET_ASYNC_MAX_CONNECTIONS``
  connection slots, and concurrent result reads in one loop turn go out as one MGET: thousands of
  concurrent waits share a few connections.
* Publishing goes through ``producer/publishing.py`` (kombu, which is synchronous) on one
  dedicated thread, so the loop never waits on a socket.

Use ``async with AsyncFleetClient(url) as client: ...`` (or ``await client.close()``).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar, cast

from pydantic import BaseModel

from producer import keys, telemetry
from producer.async_model_control import AsyncModelControl
from producer.celery_config import PRIORITY_DEFAULT
from producer.contract import GenerateResult, JobStatus, ModelKind, TrainProgress
from producer.contract.inference import EmbedEncoding
from producer.core import requests as core_requests
from producer.core import results as core_results
from producer.core import router as core_router
from producer.core import waits as core_waits
from producer.core.jobs import connection_name, new_client_prefix, result_key
from producer.core.options import SubmitOptions, parse_options
from producer.errors import FleetRedisError
from producer.publishing import Publisher
from producer.redis_connection import WAIT_SOCKET_TIMEOUT_S, async_redis_client, redis_client, redis_errors
from producer.scripts import SETTLE_UNSTARTED, settle_call
from producer.settings import FleetSettings, client_settings

__all__ = ["AsyncFleetClient", "AsyncJobHandle"]

T = TypeVar("T")

#: The listener task's longest block on its connection (s).
LISTEN_POLL_S = 1.0


class AsyncJobHandle(core_waits.HandleBase):
    """A submitted job, followed without blocking the event loop. ``kind`` is known locally for
    handles this client submitted; else ``await info()`` reads it."""

    _client: AsyncFleetClient

    async def info(self) -> core_waits.JobInfo:
        """What the client knows about the job (read from its job record once, if it was not submitted here)."""
        if self._info is None:
            await self._client._describe([self])
        return self._info  # type: ignore[return-value]

    async def status(self) -> JobStatus:
        """Current status; ``UNKNOWN`` when Redis holds neither a record nor a result for the id.
        A queued job past its deadline is marked ``EXPIRED`` (as ``JobHandle.status``)."""
        return await self._client._status(self)

    async def result(self, timeout: float | None = 60.0) -> BaseModel:
        """Wait up to ``timeout`` seconds (None: forever); return the typed result (errors as ``JobHandle.result``)."""
        return core_waits.raise_or_return([item async for item in self._client.as_completed([self], timeout)])

    async def cancel(self) -> None:
        """Cancel the job: a queued job never runs (and reports ``CANCELLED`` at once), a running one
        stops at its next safe point."""
        await self._client._cancel(self)

    async def progress(self) -> TrainProgress | None:
        """The latest progress a running training job reported, or None (not started, or not training)."""
        stored = await self._client._command(self._client._redis.get, result_key(self.id))
        return core_results.progress_of(core_results.decode_meta(stored))

    async def stream(self, timeout: float | None = 60.0) -> AsyncIterator[str]:
        """Yield generated text pieces as the worker produces them (``generate(..., stream=True)``).

        Blocking XREAD on the job's Redis stream (no polling); ``timeout`` bounds the wait for each
        next piece. After the last piece the result is checked, so a failed, cancelled or expired job
        raises as ``result()`` would.
        """
        info = await self.info()
        if not info.streams:
            yield cast(GenerateResult, await self.result(timeout=timeout)).text  # not streaming: the whole text
            return
        cursor = core_waits.StreamCursor(self.id, info, timeout, time.monotonic())
        within = self._client._within
        while not cursor.ended:
            entries = await within(cursor.left(time.monotonic()), [], self._client._read_stream(
                self.id, cursor.last_id, cursor.block_ms(time.monotonic())))
            for piece in cursor.feed(entries, time.monotonic()):
                yield piece
            if cursor.settle_due(time.time()):
                await within(cursor.left(time.monotonic()), None, self._client._expire_in_wait(self.id))
            if not (cursor.ended or entries) and cursor.timed_out(time.monotonic()):
                if not await within(1.0, False, self._client._finished(self.id)):
                    raise cursor.timeout_error()
                break
        await self.result(timeout=timeout)


class AsyncFleetClient:
    """Submit jobs to a Fleet and follow them from asyncio code.

    ``redis_url`` defaults to ``$REDIS_URL``, else ``redis://127.0.0.1:6379/0``. Validation
    happens in the calling coroutine, before anything is sent.
    """

    def __init__(self, redis_url: str | None = None, *, settings: FleetSettings | None = None):
        self.settings = settings = client_settings(redis_url, settings)
        prefix = new_client_prefix()
        #: The name its Redis connections carry (``CLIENT LIST``): this for publishing, this plus ``-wait``
        #: for the ``async_max_connections`` command connections and the subscription.
        self.name = connection_name(prefix)
        slots = settings.async_max_connections
        # One connection more than the command slots: the subscription holds its own.
        self._redis = async_redis_client(settings, max_connections=slots + 1, socket_timeout=WAIT_SOCKET_TIMEOUT_S,
                                         client_name=f"{self.name}-wait")
        self._slots = asyncio.Semaphore(slots)
        self._publisher = Publisher(settings, redis_client(settings, client_name=self.name), prefix)
        self._router = core_router.ResultRouter(prefix)
        self._reads = _BatchedReads(self)
        self._listener = _AsyncListener(self, self._router)
        self._settle_script = self._redis.register_script(SETTLE_UNSTARTED)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fleet-publish")
        self._models = AsyncModelControl(self._publisher, self._in_publisher_thread, self._pop_reply)
        self._closed = False
        telemetry.setup_producer()

    async def __aenter__(self) -> AsyncFleetClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Stop the result listener, release Redis connections and the publishing thread."""
        if self._closed:
            return
        self._closed = True
        await self._listener.stop()
        await self._reads.close()
        await self._redis.aclose()
        await self._in_publisher_thread(self._publisher.close)
        self._executor.shutdown(wait=False)

    # --- submitting ---------------------------------------------------------------------

    async def embed(self, texts: Sequence[str], model: str = "minilm", *, normalize: bool = True,
                    encoding: EmbedEncoding = "float", priority: int = PRIORITY_DEFAULT,
                    **options: Any) -> AsyncJobHandle:
        """Submit an embedding job for ``texts`` (as ``FleetClient.embed``)."""
        fields = core_requests.embed_fields(texts, model, normalize, encoding)
        return await self._submit_one(ModelKind.EMBED.value, fields, {"priority": priority, **options})

    async def classify(self, texts: Sequence[str] | None = None, model: str | None = None, *,
                       inputs: Sequence[Sequence[float]] | None = None, top_k: int = 1,
                       priority: int = PRIORITY_DEFAULT, **options: Any) -> AsyncJobHandle:
        """Submit a classification job for ``texts`` or ``inputs`` (as ``FleetClient.classify``)."""
        fields = core_requests.classify_fields(texts, model, inputs, top_k)
        return await self._submit_one(ModelKind.CLASSIFY.value, fields, {"priority": priority, **options})

    async def generate(self, prompt: str, model: str, *, priority: int = PRIORITY_DEFAULT,
                       **fields: Any) -> AsyncJobHandle:
        """Submit a generation job (as ``FleetClient.generate``)."""
        return await self._submit_one(ModelKind.GENERATE.value, {"prompt": prompt, "model": model},
                                      {"priority": priority, **fields})

    async def train(self, kind: str, dataset: str | None = None, **fields: Any) -> AsyncJobHandle:
        """Submit a training job (as ``FleetClient.train``)."""
        return await self._submit_one(core_requests.TRAIN_KIND, core_requests.train_fields(kind, dataset), fields)

    async def embed_many(self, texts_per_job: Iterable[Sequence[str]], model: str = "minilm", *,
                         normalize: bool = True, encoding: EmbedEncoding = "float", priority: int = PRIORITY_DEFAULT,
                         **options: Any) -> list[AsyncJobHandle]:
        """Submit one embedding job per entry of ``texts_per_job``; handles in order (as ``FleetClient``)."""
        requests = core_requests.build_many(ModelKind.EMBED.value, texts_per_job,
                                            lambda texts: core_requests.embed_fields(texts, model, normalize, encoding))
        return await self.submit_many(ModelKind.EMBED, requests, priority=priority, **options)

    async def submit_many(self, kind: ModelKind | str, requests: Sequence[BaseModel | dict[str, Any]], *,
                          priority: int = PRIORITY_DEFAULT, **options: Any) -> list[AsyncJobHandle]:
        """Submit many jobs of one kind in pipelined batches; handles in order (as ``FleetClient.submit_many``)."""
        kind = core_requests.check_kind(kind)
        checked = core_requests.build_many(kind, requests)
        return await self._publish(kind, checked, parse_options({"priority": priority, **options}, bulk=True))

    def job(self, job_id: str) -> AsyncJobHandle:
        """The handle of an existing job, e.g. one submitted by another process."""
        return AsyncJobHandle(self, job_id)

    @property
    def models(self) -> AsyncModelControl:
        """``await client.models()``: the catalog; ``await client.models.load(name)`` and its siblings: the
        lifecycle commands (as ``FleetClient.models``)."""
        return self._models

    async def _submit_one(self, kind: str, fields: dict[str, Any], extra: dict[str, Any]) -> AsyncJobHandle:
        request, options = core_requests.build_request(kind, fields, extra)
        return (await self._publish(kind, [request], options))[0]

    async def _publish(self, kind: str, requests: list[BaseModel], options: SubmitOptions) -> list[AsyncJobHandle]:
        coverage = self._router.coverage()  # None until the client first waits: then results are read once
        submitted = await self._in_publisher_thread(self._publisher.publish, kind, requests, options)
        return [AsyncJobHandle(self, item.job_id, item.info(coverage)) for item in submitted]

    # --- collecting ---------------------------------------------------------------------

    async def gather(self, handles: Sequence[AsyncJobHandle], timeout: float | None = 60.0, *,
                     return_exceptions: bool = False) -> list[Any]:
        """Wait for all ``handles``; typed results in the same order (errors as in ``FleetClient.gather``)."""
        outcomes = {handle.id: outcome async for handle, outcome in self.as_completed(handles, timeout)}
        return core_waits.ordered_outcomes(handles, outcomes, return_exceptions)

    async def as_completed(self, handles: Iterable[AsyncJobHandle], timeout: float | None = 60.0
                           ) -> AsyncIterator[tuple[AsyncJobHandle, Any]]:
        """Yield ``(handle, outcome)`` as each job finishes, each exactly once (``JobTimeoutError`` at the end)."""
        handles = list(handles)
        await self._describe([handle for handle in handles if handle._info is None])
        infos = {handle.id: handle._info or core_waits.JobInfo() for handle in handles}
        wait = core_waits.Wait(handles, infos, timeout, time.monotonic())
        inbox: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()

        def deliver(job_id: str, meta: Any) -> None:
            inbox.put_nowait((job_id, meta))

        await self._listener.ensure_started()
        plan = self._router.watch(wait.waits(), deliver)
        try:
            for job_id, meta in plan.ready:
                wait.accept(job_id, meta)
            await self._listener.subscribe(plan.subscribe)
            wait.accept_read(await self._within(wait.left(time.monotonic()), [], self._read_results(plan.read_now)))
            while True:
                step = wait.step(time.time(), time.monotonic())
                for item in step.emit:
                    yield item
                for job_id in step.settle:
                    marker = await self._within(wait.left(time.monotonic()), None, self._expire_in_wait(job_id))
                    wait.accept(job_id, core_results.decode_meta(marker))
                wait.accept_read(await self._within(wait.left(time.monotonic()), [], self._read_results(step.read)))
                if step.done:
                    break
                for job_id, meta in await _take(inbox, step.pause):
                    wait.accept(job_id, meta)
        finally:
            await self._listener.unsubscribe(self._router.unwatch(wait.handles, deliver))
        for item in wait.finish():
            yield item

    # --- Redis I/O ----------------------------------------------------------------------

    @staticmethod
    async def _within(seconds: float | None, fallback: T, awaitable: Awaitable[T]) -> T:
        """What ``awaitable`` gives, or ``fallback`` once ``seconds`` have passed (None: no bound): a Redis
        command that a wait sends never outlasts the wait (the patient retry rides out up to ~19 s)."""
        try:
            async with asyncio.timeout(seconds):
                return await awaitable
        except TimeoutError:
            return fallback

    async def _command(self, call: Callable[..., Awaitable[T]], *args: Any, **kwargs: Any) -> T:
        """One Redis command on one of the client's connection slots."""
        async with self._slots:
            with redis_errors(self.settings.redis_url):
                return await call(*args, **kwargs)

    async def _describe(self, handles: list[AsyncJobHandle]) -> None:
        if not handles:
            return
        pipe = self._redis.pipeline(transaction=False)
        for handle in handles:
            pipe.hmget(keys.job_record(handle.id), core_waits.RECORD_FIELDS)
        for handle, values in zip(handles, await self._command(pipe.execute)):
            handle._info = core_waits.JobInfo.from_record(values)

    async def _read_results(self, job_ids: list[str]) -> list[tuple[str, bytes | None]]:
        """The stored results of ``job_ids``; none on a Redis error (the wait goes on)."""
        try:
            return await self._reads.get(job_ids)
        except Exception:  # noqa: BLE001 - a wait never fails on Redis: it ends at its timeout
            return []

    async def _read_stream(self, job_id: str, last_id: str, block_ms: int) -> list[Any]:
        """The next entries of a token stream; none on a Redis error (after ``block_ms``: the wait goes on)."""
        try:
            reply: Any = await self._command(self._redis.xread, {keys.token_stream(job_id): last_id}, count=64,
                                             block=block_ms)
        except FleetRedisError:
            await asyncio.sleep(block_ms / 1000)
            return []
        return reply[0][1] if reply else []

    async def _finished(self, job_id: str) -> bool:
        """Whether a final result is stored for the job (False when Redis does not answer)."""
        pairs = await self._read_results([job_id])
        metas = (core_results.decode_meta(payload) for _, payload in pairs)
        return any(meta is not None and meta.ready for meta in metas)

    async def _expire_in_wait(self, job_id: str) -> bytes | None:
        """``_settle`` a job whose deadline passed while someone waits for it; None when Redis does not answer."""
        try:
            return await self._settle(job_id, core_results.REASON_EXPIRED)
        except FleetRedisError:
            return None

    async def _status(self, handle: AsyncJobHandle) -> JobStatus:
        pipe = self._redis.pipeline(transaction=False)
        pipe.get(result_key(handle.id))
        pipe.hmget(keys.job_record(handle.id), core_waits.RECORD_FIELDS)
        raw, record = await self._command(pipe.execute)
        info = core_waits.JobInfo.from_record(record)
        if handle._info is None:
            handle._info = info
        meta = core_results.decode_meta(raw)
        if meta is None and info.expires_at is not None and time.time() >= info.expires_at:
            meta = core_results.decode_meta(await self._settle(handle.id, core_results.REASON_EXPIRED))
        return core_results.status_of(meta, has_record=info.kind is not None)

    async def _settle(self, job_id: str, reason: str) -> bytes | None:
        call_keys, args = settle_call(job_id, core_results.unstarted_marker(job_id, reason, time.time()),
                                      self.settings.result_expires_s, reason)
        return await self._command(self._settle_script, keys=call_keys, args=args)

    async def _cancel(self, handle: AsyncJobHandle) -> None:
        await self._command(self._redis.set, keys.cancel_flag(handle.id), "1", ex=self.settings.result_expires_s)
        await self._settle(handle.id, core_results.REASON_CANCELLED)
        await self._in_publisher_thread(self._publisher.app.control.revoke, handle.id)

    async def _pop_reply(self, key: str, timeout: float) -> Any:
        """BLPOP ``key`` for up to ``timeout`` seconds (below the connections' socket timeout) on a command slot."""
        return await self._command(self._redis.blpop, [key], timeout=timeout)

    async def _in_publisher_thread(self, function: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, function, *args)


async def _take(inbox: asyncio.Queue[tuple[str, Any]], timeout: float) -> list[tuple[str, Any]]:
    """What the inbox holds, once it holds anything (waiting up to ``timeout`` seconds for the first)."""
    try:
        first = await asyncio.wait_for(inbox.get(), timeout)
    except TimeoutError:
        return []
    return [first, *(inbox.get_nowait() for _ in range(inbox.qsize()))]


class _BatchedReads:
    """Result reads asked for in one event-loop turn go out together: one MGET per ``KEYS_PER_COMMAND`` keys."""

    def __init__(self, client: AsyncFleetClient):
        self._client = client
        self._wanted: dict[str, list[asyncio.Future[bytes | None]]] = {}
        self._flush: asyncio.Task[None] | None = None
        self._running: set[asyncio.Task[None]] = set()

    async def get(self, job_ids: list[str]) -> list[tuple[str, bytes | None]]:
        if not job_ids:
            return []
        loop = asyncio.get_running_loop()
        futures = []
        for job_id in job_ids:
            future: asyncio.Future[bytes | None] = loop.create_future()
            self._wanted.setdefault(job_id, []).append(future)
            futures.append(future)
        if self._flush is None:
            self._flush = loop.create_task(self._read_all())
            self._running.add(self._flush)
            self._flush.add_done_callback(self._running.discard)
        return list(zip(job_ids, await asyncio.gather(*futures)))

    async def close(self) -> None:
        """Stop reads still in flight (their waiters are gone or going)."""
        for task in self._running:
            task.cancel()
        await asyncio.gather(*self._running, return_exceptions=True)

    async def _read_all(self) -> None:
        await asyncio.sleep(0)  # let the other readers of this turn add their keys
        wanted, self._wanted, self._flush = self._wanted, {}, None
        job_ids = list(wanted)
        try:
            for start in range(0, len(job_ids), core_router.KEYS_PER_COMMAND):
                chunk = job_ids[start:start + core_router.KEYS_PER_COMMAND]
                # bytes or None: Fleet's clients do not decode replies (redis-py types them bytes | str).
                values: list[Any] = await self._client._command(self._client._redis.mget,
                                                                [result_key(job_id) for job_id in chunk])
                for job_id, value in zip(chunk, values):
                    for future in wanted.pop(job_id):
                        if not future.done():
                            future.set_result(value)
        except Exception as exc:  # noqa: BLE001 - every reader still waiting gets the error
            for futures in wanted.values():
                for future in futures:
                    if not future.done():
                        future.set_exception(exc)


class _AsyncListener:
    """The client's one result subscription, read by one background task that feeds the router."""

    def __init__(self, client: AsyncFleetClient, router: core_router.ResultRouter):
        self._client = client
        self._router = router
        self._pubsub: Any = None
        self._task: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()

    async def ensure_started(self) -> None:
        """Subscribe (once) and wait for Redis to confirm, so that nothing published later is missed."""
        async with self._lock:
            if self._task is not None:
                return
            pubsub = self._client._redis.pubsub()
            try:
                with redis_errors(self._client.settings.redis_url):
                    async with asyncio.timeout(core_router.SUBSCRIBE_CONFIRM_S):
                        await pubsub.psubscribe(self._router.pattern)
                        while (message := await pubsub.get_message(timeout=LISTEN_POLL_S)) is None \
                                or message["type"] != "psubscribe":
                            pass
            except BaseException:
                await pubsub.aclose()
                raise
            self._router.on_pattern_confirmed()
            self._pubsub = pubsub
            self._task = asyncio.get_running_loop().create_task(self._run(), name="fleet-results")

    async def subscribe(self, job_ids: list[str]) -> None:
        await self._write("subscribe", job_ids)

    async def unsubscribe(self, job_ids: list[str]) -> None:
        await self._write("unsubscribe", job_ids)

    async def _write(self, command: str, job_ids: list[str]) -> None:
        if not job_ids or self._pubsub is None:
            return
        try:
            async with self._lock:
                for start in range(0, len(job_ids), core_router.KEYS_PER_COMMAND):
                    channels = [result_key(job_id) for job_id in job_ids[start:start + core_router.KEYS_PER_COMMAND]]
                    await getattr(self._pubsub, command)(*channels)
        except Exception:  # noqa: BLE001 - the connection is being re-established; redis-py subscribes again
            pass

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except BaseException:  # noqa: BLE001 - cancelled, or ended by a connection error: stopping either way
                pass
        if self._pubsub is not None:
            await self._pubsub.aclose()

    async def _run(self) -> None:
        while True:
            try:
                message = await self._pubsub.get_message(timeout=LISTEN_POLL_S)
                if message is not None:
                    await self._handle(message)
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - the connection failed: redis-py reconnects and resubscribes
                self._router.on_connection_lost()
                await asyncio.sleep(core_router.RECONNECT_PAUSE_S)

    async def _handle(self, message: dict[str, Any]) -> None:
        kind = message["type"]
        if kind in ("pmessage", "message"):
            self._router.on_message(message["channel"], message["data"])
        elif kind == "psubscribe":
            self._router.on_read(await self._client._read_results(self._router.on_pattern_confirmed()))
        elif kind == "subscribe":
            job_ids = self._router.on_channel_confirmed(message["channel"])
            self._router.on_read(await self._client._read_results(job_ids))
