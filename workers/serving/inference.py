"""Inference jobs, consumer side: validate against the model's card, tokenise, hand over, answer.

Each function takes the consumer runtime, a validated request and the job's context, sends
the job to the device process (workers/serving/device_client.py) and returns the contract
result as a JSON-ready dict. A result's ``model`` is the model reference that computed it: for a
job naming a versioned model without a version, ``name@version`` of the current version.
Embedding and classification rows come back as one float32 frame; the result is built from it
with NumPy (no torch here): vectors for ``"float"`` results stay a float32 array that the orjson
serializer writes directly (producer/serialization.py), base64 vectors are the rows' bytes.
"""

from __future__ import annotations

import base64
import time
from typing import Any

import numpy as np

from producer.contract import (
    ClassifyRequest,
    EmbedRequest,
    ErrorCode,
    GenerateRequest,
    ModelKind,
    TrainRequest,
)
from producer.errors import JobFailedError
from workers.observability import telemetry
from workers.serving import ipc
from workers.serving.device_client import DeviceLost
from workers.serving.finite_outputs import require_finite
from workers.serving.runtime import ConsumerRuntime, ModelCard

#: While a generation or training job runs, its cancel flag is read at most this often (s): one EXISTS.
CANCEL_POLL_S = 0.1


class Float32Rows:
    """Embedding vectors on their way to the result: the float32 rows as orjson writes them
    (``__json__``, producer/serialization.py), and a short ``repr`` for Celery's task log line."""

    __slots__ = ("rows",)

    def __init__(self, rows: np.ndarray):
        self.rows = rows

    def __json__(self) -> np.ndarray:
        return self.rows

    def __repr__(self) -> str:
        return f"<{self.rows.shape[0]} float32 vectors of {self.rows.shape[1]}>"


class Cancelled(Exception):
    """The job was cancelled while it ran; the task stores REVOKED."""


class ModelFailed(Exception):
    """The model raised while computing this job (``code``: ``model_error`` or ``out_of_memory``).

    Unlike ``JobFailedError`` it may be transient: the task retries it up to the attempt limit.
    """

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


class Expired(Exception):
    """The job's deadline passed while it waited on the device (for a generation slot)."""


def _raise_for(reply: dict[str, Any]) -> None:
    """Turn a failure reply of the device process into the exception the task layer handles."""
    if reply.get("ok"):
        return
    error = reply.get("error") or {}
    code, message = error.get("code", ErrorCode.INTERNAL.value), error.get("message", "device error")
    if code == "unavailable":
        raise DeviceLost(message)
    if code == "cancelled":
        raise Cancelled()
    if code == "expired":
        raise Expired()
    if code in (ErrorCode.MODEL_ERROR.value, ErrorCode.OUT_OF_MEMORY.value):
        raise ModelFailed(code, message)
    raise JobFailedError(code, message, error.get("details") or {})


def _rows(runtime: ConsumerRuntime, card: ModelCard, header: dict[str, Any], payloads: tuple[bytes, ...],
          context: Any, what: str) -> np.ndarray:
    """One infer round trip to the device: a float32 row per input, checked to be finite (``what``: its name)."""
    reply, frames = runtime.client.request({"op": "infer", "model": card.name, "job": context.job_id,
                                            "trace": context.traceparent, "isolate": context.isolate, **header},
                                           payloads)
    _raise_for(reply)
    if reply.get("batch"):
        telemetry.link_to_batch(reply["batch"])
    rows = ipc.decode_matrix(reply["shape"], frames[0])
    require_finite(rows, what, card.name)
    return rows


def _tokenise(runtime: ConsumerRuntime, card: ModelCard, texts: list[str]) -> tuple[bytes, bytes]:
    with telemetry.tokenize_span(card.name, card.kind.value, len(texts)) as span:
        id_lists = runtime.encoder(card).encode(texts)
        telemetry.record_tokens(span, id_lists)
    return ipc.encode_tokens(id_lists)


def embed(runtime: ConsumerRuntime, request: EmbedRequest, context: Any) -> dict[str, Any]:
    """Embed ``request.texts``: pooled on the device (L2-normalised there if asked), one vector per text."""
    card = runtime.model(request.model, ModelKind.EMBED)
    rows = _rows(runtime, card, {"normalize": request.normalize}, _tokenise(runtime, card, list(request.texts)),
                 context, "embedding")
    result: dict[str, Any] = {"model": card.name, "device": card.device, "dim": int(rows.shape[1]),
                              "encoding": request.encoding}
    if request.encoding == "base64":
        result["vectors_b64"] = [base64.b64encode(row.tobytes()).decode("ascii") for row in rows]
    else:
        result["vectors"] = Float32Rows(rows)
    return result


def classify(runtime: ConsumerRuntime, request: ClassifyRequest, context: Any) -> dict[str, Any]:
    """The ``top_k`` labels per input by softmax score (texts for text models, ``inputs`` for feature models)."""
    card = runtime.model(request.model, ModelKind.CLASSIFY)
    if request.texts is not None and card.input_kind == "texts":
        payloads: tuple[bytes, ...] = _tokenise(runtime, card, list(request.texts))
        header: dict[str, Any] = {}
    elif request.inputs is not None and card.input_kind == "features":
        wrong = [i for i, vector in enumerate(request.inputs) if len(vector) != card.features]
        if wrong:
            raise JobFailedError(ErrorCode.INVALID_INPUT.value,
                                 f"model {request.model!r} takes {card.features} features per input",
                                 {"inputs_with_wrong_length": wrong[:20]})
        shape, raw = ipc.encode_matrix(np.asarray(request.inputs, dtype=np.float32))
        header, payloads = {"shape": shape}, (raw,)
    else:
        raise JobFailedError(ErrorCode.INVALID_INPUT.value,
                             f"model {request.model!r} classifies {card.input_kind}, not "
                             f"{'texts' if request.texts is not None else 'inputs'}")
    probabilities = _rows(runtime, card, header, payloads, context, "score")
    top_k = min(request.top_k, len(card.labels))
    order = np.argsort(-probabilities, axis=1, kind="stable")[:, :top_k]
    predictions = [[{"label": card.labels[index], "score": float(row[index])} for index in picks]
                   for row, picks in zip(probabilities, order)]
    return {"model": card.name, "device": card.device, "predictions": predictions}


def _follow(runtime: ConsumerRuntime, header: dict[str, Any], context: Any, on_event,
            model: str = "") -> dict[str, Any]:
    """A long job on the device (generation, training): relay its events; pass a cancel on to the device."""
    next_check = time.monotonic() + CANCEL_POLL_S
    cancel_sent = False

    def check_cancel() -> None:
        nonlocal next_check, cancel_sent
        if cancel_sent or time.monotonic() < next_check:
            return
        next_check = time.monotonic() + CANCEL_POLL_S
        if context.cancelled():
            runtime.client.send({"op": "cancel", "job": context.job_id, "model": model})
            cancel_sent = True

    reply, _ = runtime.client.request({**header, "job": context.job_id, "trace": context.traceparent},
                                      on_event=on_event, periodically=check_cancel)
    _raise_for(reply)
    return reply["result"]


def generate(runtime: ConsumerRuntime, request: GenerateRequest, context: Any) -> dict[str, Any]:
    """Generate on the device's engine; stream pieces to the job's Redis stream if asked (the stream
    gets its end marker however the job ends); pass a cancel on; raise ``Cancelled``/``Expired``."""
    card = runtime.model(request.model, ModelKind.GENERATE)
    deadline = context.deadline()
    header = {"op": "generate", "request": {**request.model_dump(mode="json"), "model": card.name},
              "priority": context.priority, "deadline": None if deadline is None else deadline.timestamp()}
    try:
        return _follow(runtime, header, context, lambda event: context.publish_piece(event["text"]), card.name)
    finally:
        if request.stream:
            context.publish_piece(None)


def train(runtime: ConsumerRuntime, request: TrainRequest, context: Any, on_progress) -> dict[str, Any]:
    """Run a training job on the device; ``on_progress(progress_dict)`` at most about once a second."""
    return _follow(runtime, {"op": "train", "request": request.model_dump(mode="json")}, context,
                   lambda event: on_progress(event["progress"]))
