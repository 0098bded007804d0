"""JSON on the wire, written and read with orjson: kombu's ``json`` serializer, faster.

``install()`` registers orjson with kombu under the name ``json`` and the same content type,
``application/json`` (utf-8), so task messages, results and events are the same JSON any
Celery client reads; only the speed differs. Float results are most of the bytes of an
embedding job: orjson formats a float32 vector (a NumPy array, passed as is by the
worker) with the shortest decimals that give back exactly that float32 value, with no
Python float object per number.

Where orjson cannot represent something, kombu's own JSON code takes over, so nothing that
kombu's serializer accepted is refused: objects orjson does not know go through kombu's type
registry (``{"__type__": ..., "__value__": ...}``), integers beyond 64 bits are written by
kombu, and a document holding ``"__type__"`` markers, or that orjson refuses to read (NaN
literals, integers beyond 64 bits), is read by kombu. Registration is process-wide (kombu's
serializer registry is global); it is idempotent.
"""

from __future__ import annotations

import math
from typing import Any

import orjson
from kombu import serialization
from kombu.utils import json as kombu_json

_OPTIONS = orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_NON_STR_KEYS
_TYPE_MARKER = b'"__type__"'
#: kombu serializer name of strict JSON: ``dumps_strict``, content type ``application/json``.
STRICT_JSON = "fleet-strict-json"


def _default(value: Any) -> Any:
    """The JSON form of a type orjson does not know: the value's own ``__json__()`` if it has one
    (workers wrap float32 arrays so), else kombu's encoding (datetime subclasses, Decimal, ...)."""
    as_json = getattr(value, "__json__", None)
    if as_json is not None:
        return as_json()
    return kombu_json.JSONEncoder().default(value)


def dumps(value: Any) -> bytes:
    """``value`` as UTF-8 JSON bytes."""
    try:
        return orjson.dumps(value, default=_default, option=_OPTIONS)
    except orjson.JSONEncodeError:  # e.g. an integer beyond 64 bits
        written: str = kombu_json.dumps(value)  # kombu leaves its return type out
        return written.encode()


def dumps_strict(value: Any) -> bytes:
    """``dumps``, but a NaN or an infinity anywhere in ``value`` raises ``ValueError`` instead of being
    written (orjson would write ``null``; ``NaN`` is not JSON). Objects with ``__json__`` are trusted
    to be finite (the worker checks the arrays it wraps so)."""
    _require_finite(value)
    return dumps(value)


def _require_finite(value: Any) -> None:
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"Out of range float values are not JSON compliant: {value!r}")
    elif isinstance(value, dict):
        for item in value.values():
            _require_finite(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            _require_finite(item)


def loads(data: bytes | bytearray | memoryview | str) -> Any:
    """Inverse of ``dumps``; accepts whatever kombu's JSON reader accepts."""
    if isinstance(data, (memoryview, bytearray)):
        data = bytes(data)
    has_marker = _TYPE_MARKER in data if isinstance(data, bytes) else _TYPE_MARKER.decode() in data
    if has_marker:
        return kombu_json.loads(data)
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        return kombu_json.loads(data)


def install() -> None:
    """Make kombu's ``json`` serializer (and so Celery's) use ``dumps``/``loads`` in this process, and
    register ``STRICT_JSON`` (workers store results with it; readers decode it as ``application/json``)."""
    serialization.register("json", dumps, loads, content_type="application/json", content_encoding="utf-8")
    serialization.register(STRICT_JSON, dumps_strict, None, content_type="application/json", content_encoding="utf-8")
