"""The local messages between a worker group's consumer processes and its device process.

Transport: ZeroMQ over a Unix socket (``ipc://``). The device process binds one ROUTER
socket; each consumer task thread owns a DEALER socket (ZeroMQ sockets are not
thread-safe, and one socket per thread needs no hand-off between threads). A message is a
list of frames: a small JSON header (orjson), then zero or more binary frames that carry
arrays as raw little-endian bytes, so no float or token id is formatted or parsed.

Requests (consumer -> device), header fields:

* ``{"op": "infer", "rid", "model", "job", "trace", "isolate", "normalize"}`` and either two
  frames (token ids int32 of all texts concatenated, and each text's length int32) for text
  models, or one frame (float32 row-major) plus ``"shape": [rows, features]`` for feature
  models. Reply: ``{"rid", "ok": true, "shape": [rows, cols]}`` and one float32 frame: one row
  per input (pooled, optionally L2-normalised embeddings; or class probabilities).
* ``{"op": "generate", "rid", "job", "trace", "request": <GenerateRequest JSON>, "deadline", "priority"}``
  (deadline: UNIX seconds or null): replies ``{"rid", "event": "piece", "text"}`` as text becomes
  final, then ``{"rid", "ok": true, "result": <GenerateResult JSON>}``, or a failure with code
  ``cancelled``, ``expired`` (it waited for a slot past its deadline), ``unavailable`` (handed back:
  the device is stopping), ``prompt_too_long``, ``model_error``.
* ``{"op": "train", "rid", "job", "request": <TrainRequest JSON>}``: replies
  ``{"rid", "event": "progress", "progress": <TrainProgress JSON>}``, then the final result.
* ``{"op": "cancel", "job", "model"}``: stop that job at its next safe point (no reply).
* ``{"op": "load", "rid", "spec": <ModelSpec JSON>, "slot"}`` (the launcher's): load and warm the model
  on a thread of its own if its estimated size fits the free memory; reply ``{"rid", "ok": true,
  "card", "estimated_bytes", "memory_bytes", "seconds"}``, or a failure ``insufficient_memory`` (details:
  ``needed_bytes``, ``available_bytes``), ``already_loaded``, ``model_error``.
* ``{"op": "unload", "rid", "model"}``: stop serving the model (queued work answered ``unavailable``),
  free it; reply ``{"rid", "ok": true, "memory_bytes"}`` or ``not_loaded``. A later request for it is
  answered ``unavailable``.
* ``{"op": "busy", "rid", "model"}``: reply ``{"rid", "ok": true, "jobs"}``, its jobs in the device now.
* ``{"op": "ping", "rid"}``: reply ``{"rid", "ok": true}``.

A failure reply is ``{"rid", "ok": false, "error": {"code": <ErrorCode value>, "message", "details"}}``.
``rid`` is a number the sending thread chose; a reply carries it back so that a late reply
to an abandoned request is recognised and dropped. Nothing here imports torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import orjson

Frames = list[bytes]


def pack(header: dict[str, Any], *payloads: bytes) -> Frames:
    """Header plus binary frames, ready for ``socket.send_multipart``."""
    return [orjson.dumps(header), *payloads]


def unpack(frames: Sequence[bytes]) -> tuple[dict[str, Any], list[bytes]]:
    """Inverse of ``pack``: the header and the binary frames."""
    return orjson.loads(frames[0]), list(frames[1:])


def encode_tokens(id_lists: Sequence[Sequence[int]]) -> tuple[bytes, bytes]:
    """Token ids of many texts as (all ids concatenated, each text's length), int32 little-endian."""
    lengths = np.fromiter((len(ids) for ids in id_lists), dtype="<i4", count=len(id_lists))
    flat = np.fromiter((token for ids in id_lists for token in ids), dtype="<i4", count=int(lengths.sum()))
    return flat.tobytes(), lengths.tobytes()


def decode_tokens(flat: bytes, lengths: bytes) -> list[np.ndarray]:
    """Inverse of ``encode_tokens``: one int64 array of token ids per text."""
    ids = np.frombuffer(flat, dtype="<i4").astype(np.int64)
    sizes = np.frombuffer(lengths, dtype="<i4")
    if int(sizes.sum()) != len(ids) or (sizes < 0).any():
        raise ValueError(f"{len(ids)} token ids do not split into lengths summing to {int(sizes.sum())}")
    return np.split(ids, np.cumsum(sizes)[:-1]) if len(sizes) else []


def encode_matrix(rows: np.ndarray) -> tuple[list[int], bytes]:
    """A 2-D float array as (shape, float32 little-endian bytes)."""
    matrix = np.ascontiguousarray(rows, dtype="<f4")
    if matrix.ndim != 2:
        raise ValueError(f"expected a 2-D array, got shape {matrix.shape}")
    return [int(matrix.shape[0]), int(matrix.shape[1])], matrix.tobytes()


def decode_matrix(shape: Sequence[int], raw: bytes) -> np.ndarray:
    """Inverse of ``encode_matrix`` (read-only view of the bytes)."""
    rows, cols = int(shape[0]), int(shape[1])
    matrix = np.frombuffer(raw, dtype="<f4")
    if matrix.size != rows * cols:
        raise ValueError(f"{matrix.size} floats is not a {rows} x {cols} matrix")
    return matrix.reshape(rows, cols)


def error_reply(rid: Any, code: str, message: str, details: dict[str, Any] | None = None) -> Frames:
    return pack({"rid": rid, "ok": False, "error": {"code": code, "message": message, "details": details or {}}})


def send_json(connection: Any, message: Any) -> None:
    """Send ``message`` (JSON types only) on a ``multiprocessing`` pipe end.

    The group's start-up pipes (device ready, model cards to consumers) carry JSON, not pickles:
    a value of another type (a ``torch.device``, a numpy number) fails here, in the sender,
    instead of making the consumer that unpickles it import torch.
    """
    connection.send_bytes(orjson.dumps(message))


def recv_json(connection: Any) -> Any:
    """The next message that ``send_json`` sent on the other end of the pipe."""
    return orjson.loads(connection.recv_bytes())
