"""Building and validating requests from the arguments of the client's submit calls. No I/O.

Every submit call of ``FleetClient`` and ``AsyncFleetClient`` goes through ``build_request``:
one place turns ``embed(texts, model=..., **options)`` (and its siblings) into a validated
contract request plus the submission options, so the two clients cannot drift apart.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

from pydantic import BaseModel, ValidationError

from producer.contract import (
    TASK_FOR_KIND,
    TASK_TRAIN,
    TRAINING_QUEUE,
    ClassifyRequest,
    EmbedRequest,
    GenerateRequest,
    ModelKind,
    TrainRequest,
)
from producer.core.options import OPTION_NAMES, SubmitOptions, did_you_mean, parse_options
from producer.errors import InvalidRequestError

#: The kind a training job has in job records and results (not a ``ModelKind``: it has no model).
TRAIN_KIND = "train"

REQUEST_FOR_KIND: dict[str, type[BaseModel]] = {
    ModelKind.EMBED.value: EmbedRequest,
    ModelKind.CLASSIFY.value: ClassifyRequest,
    ModelKind.GENERATE.value: GenerateRequest,
    TRAIN_KIND: TrainRequest,
}


def task_for(kind: str) -> str:
    """The Celery task name jobs of ``kind`` are sent to."""
    return TASK_TRAIN if kind == TRAIN_KIND else TASK_FOR_KIND[ModelKind(kind)]


def fixed_queue(kind: str) -> str | None:
    """The queue of ``kind`` when it does not depend on the model (training), else None (see the catalog)."""
    return TRAINING_QUEUE if kind == TRAIN_KIND else None


def validate_request(model_cls: type[BaseModel], fields: Any) -> BaseModel:
    """Build ``model_cls`` from ``fields`` or raise ``InvalidRequestError`` listing every problem.

    ``errors`` are pydantic's, as a worker reports them for the same payload; the message also
    names, for an unknown field, the closest known field or submission option.
    """
    try:
        return model_cls.model_validate(fields)
    except ValidationError as exc:
        errors = [{"loc": list(e["loc"]), "msg": e["msg"], "type": e["type"]} for e in exc.errors()]
        summary = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'request'}: {e['msg']}{_suggestion(model_cls, e)}"
                            for e in errors)
        raise InvalidRequestError(f"invalid {model_cls.__name__}: {summary}", errors) from None


def _suggestion(model_cls: type[BaseModel], error: dict[str, Any]) -> str:
    if error["type"] != "extra_forbidden" or len(error["loc"]) != 1:
        return ""
    return did_you_mean(str(error["loc"][0]), [*model_cls.model_fields, *OPTION_NAMES])


def as_text_list(texts: Any) -> Any:
    """A lone string is a common slip for a one-element list: refuse it rather than embed its letters."""
    if isinstance(texts, str):
        raise InvalidRequestError("texts must be a list of strings, not a single string",
                                  [{"loc": ["texts"], "msg": "expected a list", "type": "list_type"}])
    return list(texts) if isinstance(texts, (list, tuple)) else texts


def split_options(fields: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split keyword arguments into (request fields, submission options) by option name."""
    request = {name: value for name, value in fields.items() if name not in OPTION_NAMES}
    options = {name: value for name, value in fields.items() if name in OPTION_NAMES}
    return request, options


def build_request(kind: str, fields: dict[str, Any], extra: Mapping[str, Any]) -> tuple[BaseModel, SubmitOptions]:
    """The validated request of ``kind`` and its options, from a submit call.

    ``fields`` are the request fields the call names itself (``texts``, ``model``, ...); ``extra``
    is the call's ``**kwargs``: submission options and, for ``generate`` and ``train`` only,
    further request fields. A typo such as ``dealine_s`` is refused with ``InvalidRequestError``
    naming ``deadline_s``.
    """
    if kind in (ModelKind.GENERATE.value, TRAIN_KIND):
        request_fields, option_fields = split_options(extra)
    else:
        request_fields, option_fields = {}, dict(extra)
    options = parse_options(option_fields)
    return validate_request(REQUEST_FOR_KIND[kind], {**fields, **request_fields}), options


def embed_fields(texts: Any, model: str, normalize: Any, encoding: Any) -> dict[str, Any]:
    """The ``EmbedRequest`` fields of an ``embed`` call (shared by ``embed`` and ``embed_many``)."""
    return {"texts": as_text_list(texts), "model": model, "normalize": normalize, "encoding": encoding}


def classify_fields(texts: Any, model: Any, inputs: Any, top_k: Any) -> dict[str, Any]:
    """The ``ClassifyRequest`` fields of a ``classify`` call: exactly the input kinds given."""
    fields: dict[str, Any] = {"model": model, "top_k": top_k}
    if texts is not None:
        fields["texts"] = as_text_list(texts)
    if inputs is not None:
        fields["inputs"] = [list(vector) for vector in inputs] if isinstance(inputs, (list, tuple)) else inputs
    return fields


def train_fields(kind: Any, dataset: Any) -> dict[str, Any]:
    """The ``TrainRequest`` fields a ``train`` call names itself (unset ones take the kind's defaults)."""
    return {"kind": kind, **({"dataset": dataset} if dataset is not None else {})}


def build_many(kind: str, entries: Iterable[Any], to_fields: Callable[[Any], Any] = dict) -> list[BaseModel]:
    """Validate every request of a bulk submission; one bad entry refuses all, naming its index.

    An entry is a request of ``kind`` already, or what ``to_fields`` turns into its fields (a mapping).
    """
    request_cls = REQUEST_FOR_KIND[kind]
    checked = []
    for index, entry in enumerate(entries):
        if isinstance(entry, request_cls):
            checked.append(entry)
            continue
        try:
            checked.append(validate_request(request_cls, to_fields(entry)))
        except InvalidRequestError as exc:
            raise InvalidRequestError(f"job {index}: {exc}", exc.errors) from None
        except (TypeError, ValueError):
            raise InvalidRequestError(f"job {index}: expected a {request_cls.__name__} or a mapping of its "
                                      f"fields, got {type(entry).__name__}") from None
    return checked


def check_kind(kind: Any) -> str:
    """``kind`` as the string job records use, or ``InvalidRequestError``."""
    value = kind.value if isinstance(kind, ModelKind) else kind
    if value not in REQUEST_FOR_KIND:
        raise InvalidRequestError(f"unknown job kind {kind!r}; kinds are {', '.join(REQUEST_FOR_KIND)}")
    return value
