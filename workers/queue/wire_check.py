"""What is wrong with a task message, read before Celery touches it.

A message Fleet can run (docs/PROTOCOL.md, "Message framing") is Celery message protocol 2:
a ``headers`` object naming the task (``task``, one of Fleet's task names) and the job
(``id``, a non-empty string), content type exactly ``application/json``, and a UTF-8 JSON
body ``[args, kwargs, embed]``: ``args`` an array, ``kwargs`` an object without the key
``self``, ``embed`` null or an object with at most ``callbacks``, ``errbacks``, ``chain``
(each null or an array of objects) and ``chord`` (null or an object). The content encoding
is not read: a JSON body is UTF-8 whatever its label says.

``read_task_message`` checks exactly that and nothing more: the request object inside
``args`` is the task's to validate (``invalid_input`` and the other request errors).
It never raises for any message; it imports nothing of torch.
"""

from __future__ import annotations

import reprlib
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any

#: The one content type Fleet reads (kombu's name for its ``json`` serializer).
JSON_CONTENT_TYPE = "application/json"
#: What ``embed``, the third item of a protocol-2 body, may hold, and the JSON type of each value.
EMBED_FIELDS: dict[str, type[list[Any]] | type[dict[str, Any]]] = {
    "callbacks": list, "errbacks": list, "chain": list, "chord": dict}
#: Keyword arguments that collide with the bound task's own parameter.
RESERVED_KEYWORDS = frozenset({"self"})
#: How much of a refused body, headers or error the worker quotes back (characters).
EXCERPT_CHARS = 500


@dataclass
class TaskMessage:
    """What could be read from one message.

    ``job_id`` is the job the message names, when it names one usably (the ``id`` header, or
    the ``id`` of a protocol-1 body); ``task`` the task header when it is a string; ``body``
    the decoded JSON body, once it decoded. ``problem`` is None for a message Fleet can run,
    else one sentence saying what is wrong, with JSON-safe ``details``.
    """

    job_id: str | None = None
    task: str | None = None
    body: Any = None
    problem: str | None = None
    details: dict[str, Any] = field(default_factory=dict)

    def refuse(self, problem: str, **details: Any) -> TaskMessage:
        self.problem, self.details = problem, details
        return self

    def request_object(self) -> dict | None:
        """The request the sender meant, if the body holds one where some framing would put it.

        ``[[request], ...]`` (protocol 2), ``{"task": ..., "args": [request]}`` (protocol 1) or a
        bare request object; None otherwise. Kept in the dead-letter entry so that an operator can
        re-send it (``fleet dlq retry``).
        """
        body = self.body
        if isinstance(body, dict):
            args = body.get("args") if "task" in body else [body]
        elif isinstance(body, list) and body:
            args = body[0]
        else:
            return None
        return args[0] if isinstance(args, list) and args and isinstance(args[0], dict) else None


def _bounded_repr() -> reprlib.Repr:
    """A ``repr`` that stops at a few levels of nesting and a few hundred characters per item."""
    bounded = reprlib.Repr()
    bounded.maxlevel, bounded.maxlist, bounded.maxdict = 4, 16, 16
    bounded.maxstring = bounded.maxother = EXCERPT_CHARS
    return bounded


_BOUNDED_REPR = _bounded_repr()


def excerpt(value: Any) -> str:
    """``value`` as at most ``EXCERPT_CHARS`` characters of text: a string itself, bytes read as UTF-8 (bad
    bytes escaped), anything else as a ``repr`` bounded in depth, so that any decoded body can be quoted."""
    if isinstance(value, str):
        text = value
    elif isinstance(value, (bytes, bytearray)):
        text = value[:EXCERPT_CHARS * 4].decode("utf-8", "backslashreplace")
    else:
        text = _BOUNDED_REPR.repr(value)
    return text if len(text) <= EXCERPT_CHARS else text[:EXCERPT_CHARS] + "..."


def json_type(value: Any) -> str:
    """The JSON name of ``value``'s type, as the sender wrote it."""
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", int: "a number",
             float: "a number", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def read_headers(message: Any) -> TaskMessage:
    """The job id and task name that ``message``'s headers give, where they give usable ones."""
    headers = message.headers if isinstance(message.headers, dict) else {}
    job_id, task = headers.get("id"), headers.get("task")
    return TaskMessage(job_id=job_id if isinstance(job_id, str) and job_id else None,
                       task=task if isinstance(task, str) else None)


def read_task_message(message: Any, known_tasks: Collection[str]) -> TaskMessage:
    """Read ``message`` (a received ``kombu.Message``) as a Fleet task message; see the module docstring.

    ``known_tasks`` are the task names this worker runs. Decoding goes through
    ``message.decode()``, whose result kombu caches for Celery's own reading.
    """
    read = read_headers(message)
    headers = message.headers
    if not isinstance(headers, dict):
        return read.refuse(f"the message headers are {json_type(headers)}, not an object")
    job_id, task = headers.get("id"), headers.get("task")
    if message.content_type != JSON_CONTENT_TYPE:
        return read.refuse(f"content type {excerpt(message.content_type)!r} is not {JSON_CONTENT_TYPE!r}: Fleet "
                           "reads JSON only")
    try:
        read.body = message.decode()
    except Exception as exc:  # noqa: BLE001 - kombu wraps every decoder failure; any of them refuses the message
        return read.refuse(f"the body is not valid UTF-8 JSON: {excerpt(str(exc))}", body=excerpt(message.body))
    if read.job_id is None and "id" not in headers and isinstance(read.body, dict):
        body_id = read.body.get("id")  # protocol 1 keeps the id in the body
        read.job_id = body_id if isinstance(body_id, str) and body_id else None
    if "task" not in headers:
        return read.refuse("no task header: Fleet speaks Celery message protocol 2 (Celery's default)")
    if read.task is None:
        return read.refuse(f"the task header is {json_type(task)}, not a task name", task=excerpt(task))
    if read.task not in known_tasks:
        return read.refuse(f"unknown task {excerpt(read.task)!r}", known=sorted(known_tasks))
    if "id" not in headers:
        return read.refuse("no id header: the message names no job")
    if read.job_id is None:
        return read.refuse(f"the id header is {json_type(job_id)}, not a job id (a non-empty string)",
                           id=excerpt(job_id))
    return _check_body(read)


def _check_body(read: TaskMessage) -> TaskMessage:
    """Refuse ``read`` unless its decoded body is a protocol-2 ``[args, kwargs, embed]`` Celery can run."""
    body = read.body
    if not isinstance(body, list) or len(body) != 3:
        shape = f"an array of {len(body)}" if isinstance(body, list) else json_type(body)
        return read.refuse(f"the body is {shape}, not [args, kwargs, embed] (Celery message protocol 2)",
                           body=excerpt(body))
    args, kwargs, embed = body
    if not isinstance(args, list):
        return read.refuse(f"args (the body's first item) is {json_type(args)}, not an array")
    if not isinstance(kwargs, dict):
        return read.refuse(f"kwargs (the body's second item) is {json_type(kwargs)}, not an object")
    if RESERVED_KEYWORDS & kwargs.keys():
        return read.refuse(f"kwargs name {', '.join(sorted(RESERVED_KEYWORDS & kwargs.keys()))}, which the task "
                           "reserves")
    if embed is None:
        return read
    if not isinstance(embed, dict):
        return read.refuse(f"embed (the body's third item) is {json_type(embed)}, not an object or null")
    unknown = sorted(embed.keys() - EMBED_FIELDS.keys())
    if unknown:
        return read.refuse(f"embed holds {', '.join(repr(excerpt(name)) for name in unknown)}; it may hold only "
                           f"{', '.join(EMBED_FIELDS)}")
    for name, kind in EMBED_FIELDS.items():
        value = embed.get(name)
        if value is None:
            continue
        if not isinstance(value, kind) or (kind is list and not all(isinstance(item, dict) for item in value)):
            expected = "an array of objects" if kind is list else "an object"
            return read.refuse(f"embed {name} is {json_type(value)}, not {expected} or null", **{name: excerpt(value)})
    return read
