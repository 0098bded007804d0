"""The synchronous producer API: ``FleetClient`` submits jobs, ``JobHandle`` follows one.

Nothing here imports torch or worker code; jobs are sent by task name as JSON.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, Iterator, Sequence

import redis
from celery import Celery
from celery.exceptions import TimeoutError as CeleryTimeout
from celery.result import AsyncResult
from pydantic import BaseModel, ValidationError

from producer import keys
from producer.celery_config import PRIORITY_DEFAULT, celery_config
from producer.contract import (
    CELERY_STATE_TO_STATUS,
    TASK_FOR_KIND,
    ClassifyRequest,
    ClassifyResult,
    EmbedRequest,
    EmbedResult,
    GenerateRequest,
    GenerateResult,
    JobStatus,
    ModelKind,
    inference_queue,
)
from producer.errors import (
    InvalidRequest,
    JobCancelled,
    JobFailedError,
    JobTimeout,
    UnknownModel,
    WrongModelKind,
)
from producer.settings import FleetSettings

_RESULT_MODELS: dict[str, type[BaseModel]] = {
    ModelKind.EMBED.value: EmbedResult,
    ModelKind.CLASSIFY.value: ClassifyResult,
    ModelKind.GENERATE.value: GenerateResult,
}


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

    def __init__(self, client: "FleetClient", job_id: str, kind: str | None = None):
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
        state = self._async_result.state
        if state == "PENDING" and not self._client._redis.exists(keys.job_record(self.id)):
            return JobStatus.UNKNOWN
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
        self._redis = redis.Redis.from_url(settings.redis_url)
        self.catalog = ModelCatalog(self._redis, settings.catalog_cache_s)

    def close(self) -> None:
        """Release Redis connections."""
        self._redis.close()
        self.celery.close()

    def __enter__(self) -> "FleetClient":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # --- submitting -----------------------------------------------------------------

    def embed(self, texts: Sequence[str], model: str = "minilm", *, normalize: bool = True,
              priority: int = PRIORITY_DEFAULT) -> JobHandle:
        """Submit an embedding job for ``texts``; see ``EmbedRequest`` for limits."""
        request = validate_request(EmbedRequest, {"texts": _as_list(texts), "model": model, "normalize": normalize})
        return self._submit(ModelKind.EMBED, request, priority)

    def classify(self, texts: Sequence[str] | None = None, model: str | None = None, *,
                 inputs: Sequence[Sequence[float]] | None = None, top_k: int = 1,
                 priority: int = PRIORITY_DEFAULT) -> JobHandle:
        """Submit a classification job for ``texts`` (text classifiers) or ``inputs`` (feature vectors).

        The result lists ``top_k`` labels with softmax scores per input.
        """
        fields = {"model": model, "top_k": top_k}
        if texts is not None:
            fields["texts"] = _as_list(texts)
        if inputs is not None:
            fields["inputs"] = [list(vector) for vector in inputs]
        request = validate_request(ClassifyRequest, fields)
        return self._submit(ModelKind.CLASSIFY, request, priority)

    def generate(self, prompt: str, model: str, *, priority: int = PRIORITY_DEFAULT, **options: Any) -> JobHandle:
        """Submit a generation job; ``options`` are ``GenerateRequest`` fields (max_new_tokens, ...)."""
        request = validate_request(GenerateRequest, {"prompt": prompt, "model": model, **options})
        return self._submit(ModelKind.GENERATE, request, priority)

    def job(self, job_id: str) -> JobHandle:
        """Return the handle of an existing job, e.g. one submitted by another process."""
        return JobHandle(self, job_id)

    def _submit(self, kind: ModelKind, request: BaseModel, priority: int) -> JobHandle:
        queue = self.catalog.queue_for(kind, request.model)
        job_id = str(uuid.uuid4())
        record = {"kind": kind.value, "model": request.model, "queue": queue, "submitted_at": time.time(),
                  "stream": "1" if getattr(request, "stream", False) else "0"}
        with self._redis.pipeline(transaction=False) as pipe:
            pipe.hset(keys.job_record(job_id), mapping=record)
            pipe.expire(keys.job_record(job_id), self.settings.result_expires_s)
            pipe.execute()
        self.celery.send_task(
            TASK_FOR_KIND[kind], args=[request.model_dump(mode="json")], task_id=job_id,
            queue=queue, priority=priority,
        )
        return JobHandle(self, job_id, kind.value)

    # --- results and control --------------------------------------------------------

    def _interpret(self, job_id: str, state: str, value: Any, kind: str | None) -> BaseModel:
        if state == "SUCCESS":
            result_cls = _RESULT_MODELS.get(kind or "")
            if result_cls is None:
                raise InvalidRequest(f"job {job_id} has no known kind; cannot type its result")
            return result_cls.model_validate(value)
        if state == "REVOKED":
            raise JobCancelled(f"job {job_id} was cancelled")
        if isinstance(value, JobFailedError):
            raise value
        raise JobFailedError("internal", f"job {job_id} ended in {state}: {value!r}")

    def _cancel(self, job_id: str) -> None:
        self._redis.set(keys.cancel_flag(job_id), "1", ex=self.settings.result_expires_s)
        self.celery.control.revoke(job_id)


def _as_list(texts: Sequence[str] | str) -> Any:
    """A lone string is a common slip for a one-element list: refuse it rather than embed letters."""
    if isinstance(texts, str):
        raise InvalidRequest("texts must be a list of strings, not a single string",
                             [{"loc": ["texts"], "msg": "expected a list", "type": "list_type"}])
    return list(texts) if isinstance(texts, (list, tuple)) else texts
