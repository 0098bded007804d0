"""Property tests of the request contract: validation is total and typed, accepted requests obey the
documented limits and survive a JSON round trip, and the producer and the worker agree on every payload.

Pure unit tests: no Redis, no worker process. The producer side is ``producer.client.validate_request``
(what every ``FleetClient`` submit method calls); the worker side is ``workers.queue.tasks.parse_payload``
(what every task runs on its raw arguments, after JSON decoding).
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

from hypothesis import event, example, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, ValidationError

from producer.client import validate_request
from producer.contract import (
    MODEL_NAME_PATTERN,
    PROTOCOL_VERSION,
    ClassifyRequest,
    EmbedRequest,
    ErrorCode,
    GenerateRequest,
    Limits,
    TrainRequest,
)
from producer.contract.inference import FLOAT32_MAX
from producer.contract.training import DATASETS_FOR_KIND, Precision, TrainKind
from producer.errors import InvalidRequest, JobFailedError
from workers.queue.tasks import parse_payload

REQUESTS = [EmbedRequest, ClassifyRequest, GenerateRequest, TrainRequest]
MODEL_NAME = re.compile(MODEL_NAME_PATTERN)
#: The seed range torch.Generator.manual_seed accepts (GenerateRequest.seed).
SEED_RANGE = (-(2**63), 2**64 - 1)

# --- strategies -------------------------------------------------------------------------------------

#: Any JSON-like value (floats include NaN and infinities, which Python's json, and so kombu, carries).
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)

#: Characters of valid texts (any Unicode scalar value), with quotes, escapes and wide characters favoured.
good_characters = st.characters(codec="utf-8") | st.sampled_from("a \t\n\u00e9\u4e2d\U0001f600\"\\\x00")
#: Any code point, lone surrogates included (JSON can carry them as escapes; they are not valid text).
any_characters = st.characters(codec=None, exclude_categories=()) | good_characters


def near(limit: int, low: int = 0) -> st.SearchStrategy[int]:
    """Sizes at and around ``low`` and ``limit`` (``low - 1`` and ``limit + 1`` included), and small ones."""
    return st.sampled_from([low - 1, low, low + 1, limit - 1, limit, limit + 1]) | st.integers(low - 1, low + 5)


def within(limit: int, low: int = 1) -> st.SearchStrategy[int]:
    """Sizes at ``low`` and ``limit`` and just inside them, and small ones."""
    return st.sampled_from([low, low + 1, limit - 1, limit]) | st.integers(low, min(limit, low + 5))


def sized_text(sizes: st.SearchStrategy[int], alphabet: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    """Strings of a drawn length: a short random pattern repeated and cut to that length."""
    return st.tuples(sizes.filter(lambda size: size >= 0), st.text(alphabet, min_size=1, max_size=3)).map(
        lambda size_pattern: (size_pattern[1] * size_pattern[0])[:size_pattern[0]])


def sized_list(sizes: st.SearchStrategy[int], item: st.SearchStrategy[Any]) -> st.SearchStrategy[list]:
    """Lists of a drawn length: one drawn item repeated (cheap even at 4096 items)."""
    return st.tuples(sizes.filter(lambda size: size >= 0), item).map(lambda size_item: [size_item[1]] * size_item[0])


def with_odd_item(lists: st.SearchStrategy[list]) -> st.SearchStrategy[list]:
    """A list with one arbitrary JSON value put in somewhere."""
    return st.tuples(lists, json_values, st.integers(0, 300)).map(
        lambda lst_odd_at: lst_odd_at[0][:lst_odd_at[2]] + [lst_odd_at[1]] + lst_odd_at[0][lst_odd_at[2]:])


def edge(*strategies: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """A value for a field at or past its limits, or any JSON value."""
    return st.one_of(*strategies, json_values)


# Values that the contract accepts, near its limits.
good_names = st.from_regex(MODEL_NAME_PATTERN, fullmatch=True) | st.sampled_from(["minilm", "a" * 64, "0-_"])
good_text = sized_text(within(Limits.MAX_CHARS_PER_TEXT), good_characters)
good_texts = sized_list(within(Limits.MAX_TEXTS_PER_JOB), good_text) | st.lists(good_text, min_size=1, max_size=4)
good_features = st.one_of(
    st.floats(-FLOAT32_MAX, FLOAT32_MAX), st.integers(-(2**127), 2**127),
    st.sampled_from([FLOAT32_MAX, -FLOAT32_MAX, 0, -0.0, 5e-324, -1.2345678901234567e-300]),
)
good_vector = sized_list(within(Limits.MAX_FEATURES_PER_INPUT), good_features)
good_inputs = sized_list(within(Limits.MAX_TEXTS_PER_JOB), good_vector)
good_prompt = sized_text(within(Limits.MAX_PROMPT_CHARS), good_characters).filter(str.strip)
probabilities = st.floats(0, 1, exclude_min=True) | st.sampled_from([1, 1.0, 5e-324])

# Values at or past the limits, or of the wrong kind.
any_names = st.one_of(good_names, st.sampled_from(["a" * 65, "", "Minilm", "-x", "../etc", "a b"]),
                      st.text(max_size=70))
versions = st.sampled_from([PROTOCOL_VERSION, 0, 2, 99, -1, True, 1.0, "1", None])
any_text = sized_text(near(Limits.MAX_CHARS_PER_TEXT), any_characters)
any_texts = st.one_of(sized_list(near(Limits.MAX_TEXTS_PER_JOB), any_text), with_odd_item(good_texts))
any_features = st.one_of(
    st.floats(), st.integers(),
    st.sampled_from([3.5e38, 2**128, -(2**128), 2**2000, float("nan"), float("inf"), True]),
)
any_inputs = st.one_of(
    sized_list(near(Limits.MAX_TEXTS_PER_JOB), sized_list(near(Limits.MAX_FEATURES_PER_INPUT), any_features)),
    with_odd_item(good_inputs), sized_list(within(4), with_odd_item(sized_list(within(4), good_features))),
)


def valid_training(kind: TrainKind) -> st.SearchStrategy[dict]:
    """Valid training requests of ``kind``: any field may be left to the kind's defaults."""
    return st.fixed_dictionaries({"kind": st.just(kind.value)}, optional={
        "v": st.just(PROTOCOL_VERSION),
        "dataset": st.sampled_from(DATASETS_FOR_KIND[kind]),
        "epochs": within(1000),
        "batch_size": within(4096),
        "learning_rate": st.floats(0, 1, exclude_min=True) | st.sampled_from([1, 1e-3]),
        "betas": st.tuples(*[st.floats(0, 1, exclude_max=True)] * 2).map(list),
        "eps": st.floats(0, 1, exclude_min=True),
        "weight_decay": st.floats(0, 10) | st.sampled_from([0, 10]),
        "grad_accum_steps": within(1024),
        "precision": st.sampled_from([precision.value for precision in Precision]),
        "seed": st.integers(0, 2**32 - 1),
        "checkpoint_every_steps": st.integers(1) | st.just(10**30),
        "eval_fraction": st.floats(0, 0.5, exclude_min=True, exclude_max=True),
        "register_as": st.none() | good_names,
    })


#: Per request class, valid requests near the limits (``VALID``) and, per field, values that probe it (``EDGES``).
VALID: dict[type[BaseModel], st.SearchStrategy[dict]] = {
    EmbedRequest: st.fixed_dictionaries(
        {"texts": good_texts},
        optional={"v": st.just(PROTOCOL_VERSION), "model": good_names, "normalize": st.booleans()}),
    ClassifyRequest: st.one_of(
        st.fixed_dictionaries({"texts": good_texts, "model": good_names}),
        st.fixed_dictionaries({"inputs": good_inputs, "model": good_names}),
    ).flatmap(lambda base: st.fixed_dictionaries(
        {key: st.just(value) for key, value in base.items()},
        optional={"v": st.just(PROTOCOL_VERSION), "top_k": within(Limits.MAX_LABELS_RETURNED)})),
    GenerateRequest: st.fixed_dictionaries({"prompt": good_prompt, "model": good_names}, optional={
        "v": st.just(PROTOCOL_VERSION),
        "max_new_tokens": within(Limits.MAX_NEW_TOKENS),
        "temperature": st.floats(0, 5) | st.sampled_from([0, 5, 1]),
        "top_p": probabilities,
        "seed": st.none() | st.integers(*SEED_RANGE) | st.sampled_from(SEED_RANGE),
        "stop": st.lists(good_text, max_size=Limits.MAX_STOP_STRINGS),
        "stream": st.booleans(),
    }),
    TrainRequest: st.sampled_from(TrainKind).flatmap(lambda kind: valid_training(kind)),
}

EDGES: dict[type[BaseModel], dict[str, st.SearchStrategy[Any]]] = {
    EmbedRequest: {"v": edge(versions), "texts": edge(any_texts), "model": edge(any_names),
                   "normalize": edge(st.booleans())},
    ClassifyRequest: {"v": edge(versions), "texts": edge(any_texts), "inputs": edge(any_inputs),
                      "model": edge(any_names),
                      "top_k": edge(near(Limits.MAX_LABELS_RETURNED, 1), st.sampled_from([1.0, True, "1"]))},
    GenerateRequest: {
        "v": edge(versions),
        "prompt": edge(any_text, sized_text(near(Limits.MAX_PROMPT_CHARS), st.sampled_from(" \t\n\u3000x"))),
        "model": edge(any_names),
        "max_new_tokens": edge(near(Limits.MAX_NEW_TOKENS, 1), st.sampled_from([64.0, True, "64"])),
        "temperature": edge(st.sampled_from([-0.0, 5.000001, -1e-9, float("nan"), "0.7"]), st.floats(-1, 6)),
        "top_p": edge(st.sampled_from([0, 0.0, 1.0000001, float("nan"), "0.5", True]), st.floats()),
        "seed": edge(st.integers(), st.sampled_from([SEED_RANGE[0] - 1, SEED_RANGE[1] + 1, 1.0, True])),
        "stop": edge(sized_list(near(Limits.MAX_STOP_STRINGS), any_text),
                     with_odd_item(st.lists(good_text, max_size=3))),
        "stream": edge(st.booleans()),
    },
    TrainRequest: {
        "v": edge(versions),
        "kind": edge(st.sampled_from([kind.value for kind in TrainKind] + ["gan", "", "MLP"])),
        "dataset": edge(st.sampled_from(["digits", "corpus", "imagenet", ""])),
        "epochs": edge(near(1000, 1)),
        "batch_size": edge(near(4096, 1)),
        "learning_rate": edge(st.sampled_from([0, 1.0000001, -1, "0.1", float("nan")]), st.floats(-1, 2)),
        "betas": edge(st.lists(st.sampled_from([0, 0.9, 1, 1.0, -1e-9, "0.9"]), max_size=3)),
        "eps": edge(st.sampled_from([0, 1, 1.5, -1e-9])),
        "weight_decay": edge(st.sampled_from([0, 10, 10.0001, -0.01])),
        "grad_accum_steps": edge(near(1024, 1)),
        "precision": edge(st.sampled_from(["fp32", "fp8", "FP32"])),
        "seed": edge(st.sampled_from([0, 2**32 - 1, 2**32, -1, True])),
        "checkpoint_every_steps": edge(st.sampled_from([0, 1, -1, 1.0])),
        "eval_fraction": edge(st.sampled_from([0, 0.0, 0.5, 1, 0.2, 1e-9])),
        "register_as": edge(any_names),
    },
}


@st.composite
def near_valid_payloads(draw, cls: type[BaseModel]) -> dict:
    """A valid request with up to two fields changed: set to an edge value, removed, or joined by an unknown one."""
    payload = dict(draw(VALID[cls]))
    for name in draw(st.lists(st.sampled_from(sorted(EDGES[cls])), max_size=2, unique=True)):
        action = draw(st.sampled_from(["edge", "edge", "edge", "drop", "unknown"]))
        if action == "drop":
            payload.pop(name, None)
        elif action == "unknown":
            payload[draw(st.text(max_size=8).filter(lambda key: key not in cls.model_fields))] = draw(json_values)
        else:
            payload[name] = draw(EDGES[cls][name])
    return payload


def payloads_for(cls: type[BaseModel]) -> st.SearchStrategy[Any]:
    """Near-valid requests mostly; else any JSON value, or an object of the real field names with any values."""
    names = sorted(cls.model_fields)
    return st.one_of(
        near_valid_payloads(cls), near_valid_payloads(cls), near_valid_payloads(cls),
        json_values,
        st.dictionaries(st.sampled_from(names), json_values, max_size=len(names)),
    )


# --- oracles ----------------------------------------------------------------------------------------


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return _is_int(value) or (isinstance(value, float) and math.isfinite(value))


def _is_text(value: Any, limit: int = Limits.MAX_CHARS_PER_TEXT) -> bool:
    if not (isinstance(value, str) and 1 <= len(value) <= limit):
        return False
    try:
        value.encode("utf-8")  # no lone surrogates: the text is valid Unicode, so strict JSON can carry it
    except UnicodeEncodeError:
        return False
    return True


def _is_text_list(value: Any) -> bool:
    return isinstance(value, list) and 1 <= len(value) <= Limits.MAX_TEXTS_PER_JOB and all(map(_is_text, value))


def assert_within_documented_limits(request: BaseModel) -> None:
    """The limits of docs/PROTOCOL.md and ``Limits``, checked independently of pydantic's constraints."""
    assert request.v == PROTOCOL_VERSION and _is_int(request.v)
    if isinstance(request, EmbedRequest):
        assert _is_text_list(request.texts)
        assert MODEL_NAME.match(request.model) and isinstance(request.normalize, bool)
    elif isinstance(request, ClassifyRequest):
        assert (request.texts is None) != (request.inputs is None)
        if request.texts is not None:
            assert _is_text_list(request.texts)
        else:
            assert 1 <= len(request.inputs) <= Limits.MAX_TEXTS_PER_JOB
            for vector in request.inputs:
                assert 1 <= len(vector) <= Limits.MAX_FEATURES_PER_INPUT
                assert all(_is_number(x) and abs(x) <= FLOAT32_MAX for x in vector)
        assert MODEL_NAME.match(request.model)
        assert _is_int(request.top_k) and 1 <= request.top_k <= Limits.MAX_LABELS_RETURNED
    elif isinstance(request, GenerateRequest):
        assert _is_text(request.prompt, Limits.MAX_PROMPT_CHARS) and request.prompt.strip()
        assert MODEL_NAME.match(request.model)
        assert _is_int(request.max_new_tokens) and 1 <= request.max_new_tokens <= Limits.MAX_NEW_TOKENS
        assert _is_number(request.temperature) and 0 <= request.temperature <= 5
        assert _is_number(request.top_p) and 0 < request.top_p <= 1
        assert request.seed is None or (_is_int(request.seed) and SEED_RANGE[0] <= request.seed <= SEED_RANGE[1])
        assert len(request.stop) <= Limits.MAX_STOP_STRINGS and all(map(_is_text, request.stop))
        assert isinstance(request.stream, bool)
    elif isinstance(request, TrainRequest):
        assert request.kind in TrainKind and request.dataset in DATASETS_FOR_KIND[request.kind]
        assert _is_int(request.epochs) and 1 <= request.epochs <= 1000
        assert _is_int(request.batch_size) and 1 <= request.batch_size <= 4096
        assert _is_number(request.learning_rate) and 0 < request.learning_rate <= 1
        assert len(request.betas) == 2 and all(_is_number(b) and 0 <= b < 1 for b in request.betas)
        assert _is_number(request.eps) and 0 < request.eps <= 1
        assert _is_number(request.weight_decay) and 0 <= request.weight_decay <= 10
        assert _is_int(request.grad_accum_steps) and 1 <= request.grad_accum_steps <= 1024
        assert request.precision in Precision
        assert _is_int(request.seed) and 0 <= request.seed <= 2**32 - 1
        assert _is_int(request.checkpoint_every_steps) and request.checkpoint_every_steps >= 1
        assert _is_number(request.eval_fraction) and 0 < request.eval_fraction < 0.5
        assert request.register_as is None or MODEL_NAME.match(request.register_as)
    else:  # pragma: no cover - a new request model needs its limits here
        raise AssertionError(f"no documented limits for {type(request).__name__}")


def assert_round_trips(cls: type[BaseModel], request: BaseModel) -> None:
    """model_dump(mode="json") is strict JSON (no NaN/Infinity) and validates back to an equal model."""
    text = json.dumps(request.model_dump(mode="json"), allow_nan=False)
    assert cls.model_validate(json.loads(text)) == request
    assert cls.model_validate_json(request.model_dump_json()) == request


def on_the_wire(payload: Any) -> Any:
    """What a worker's task receives: the payload after kombu's JSON encoding and decoding."""
    return json.loads(json.dumps(payload))


# --- examples that once failed ---------------------------------------------------------------------

#: A valid request of 256 texts of 8192 CJK characters: 12.6 MB as ASCII JSON, over MAX_PAYLOAD_BYTES.
#: The worker refused it ("payload exceeds 4194304 bytes") while the producer accepted it.
BIG_CJK = {"texts": ["\u4e2d" * Limits.MAX_CHARS_PER_TEXT] * Limits.MAX_TEXTS_PER_JOB}
#: A valid request of 256 x 4096 long floats (about 26 MB of JSON): refused by the worker likewise.
BIG_FEATURES = {"model": "digits-mlp",
                "inputs": [[-1.2345678901234567e-300] * Limits.MAX_FEATURES_PER_INPUT] * Limits.MAX_TEXTS_PER_JOB}


def with_examples(test):
    """The fixed cases every property also runs: the bugs these tests found, and edges."""
    cases = [
        (EmbedRequest, BIG_CJK),
        (EmbedRequest, {"texts": BIG_CJK["texts"] + ["x"]}),  # one too many and oversized: refused by both
        (EmbedRequest, {"texts": ["a"], "v": 2}),  # the producer accepted a version every worker refuses
        (EmbedRequest, {"texts": ["a"], "v": True}),
        (EmbedRequest, {"texts": ["a\ud800b"]}),  # a lone surrogate: refused by both, typed
        (EmbedRequest, ["texts"]),
        (ClassifyRequest, BIG_FEATURES),
        (ClassifyRequest, {"model": "digits-mlp", "inputs": [[float("nan"), 1.0]]}),  # accepted; no round trip
        (ClassifyRequest, {"model": "digits-mlp", "inputs": [[float("inf")]]}),
        (ClassifyRequest, {"model": "digits-mlp", "inputs": [[2**2000]]}),  # accepted; torch overflowed later
        (ClassifyRequest, {"model": "digits-mlp", "inputs": [[FLOAT32_MAX, -FLOAT32_MAX, 0]]}),
        (ClassifyRequest, {"model": "topics", "texts": ["a"], "inputs": [[1]]}),
        (GenerateRequest, {"prompt": "hi", "model": "tiny-llama", "seed": 2**64}),  # accepted; manual_seed raised
        (GenerateRequest, {"prompt": "hi", "model": "tiny-llama", "seed": 2**64 - 1, "temperature": 5}),
        (GenerateRequest, {"prompt": "hi", "model": "tiny-llama", "seed": -(2**63) - 1}),
        (GenerateRequest, {"prompt": " \t\n", "model": "tiny-llama"}),
        (GenerateRequest, {"prompt": "x" * Limits.MAX_PROMPT_CHARS, "model": "tiny-llama",
                           "stop": ["y" * Limits.MAX_CHARS_PER_TEXT] * Limits.MAX_STOP_STRINGS}),
        (GenerateRequest, {"prompt": "hi", "model": "tiny-llama", "top_p": float("nan")}),
        (TrainRequest, {"kind": "mlp"}),
        (TrainRequest, {"kind": "mlp", "v": 2}),
        (TrainRequest, {"kind": ["mlp"]}),
        (TrainRequest, {"kind": {"mlp": 1}}),
        (TrainRequest, {"dataset": "digits"}),
        (TrainRequest, {"kind": "causal_lm", "dataset": "digits"}),
        (TrainRequest, {"kind": "cnn", "betas": [0.5, 0.999999], "seed": 2**32 - 1, "eval_fraction": 0.49999}),
    ]
    for case in reversed(cases):
        test = example(case=case)(test)
    return test


#: Examples each property draws: 600, or more under a profile that asks for more (tests/conftest.py).
EXAMPLES_PER_PROPERTY = max(600, settings().max_examples)

#: A request class and a payload for it.
cases = st.sampled_from(REQUESTS).flatmap(lambda cls: st.tuples(st.just(cls), payloads_for(cls)))


# --- properties -------------------------------------------------------------------------------------


@settings(max_examples=EXAMPLES_PER_PROPERTY, deadline=None)
@given(case=cases)
@with_examples
def test_validation_accepts_within_limits_and_round_trips_or_refuses_typed(case) -> None:
    cls, payload = case
    try:
        request = cls.model_validate(payload)
    except ValidationError as exc:
        assert exc.errors(), "a refusal lists at least one problem"  # noqa: PT017 - refusal is one allowed outcome
        event(f"{cls.__name__} refused")
        return
    event(f"{cls.__name__} accepted")
    assert_within_documented_limits(request)
    assert_round_trips(cls, request)


@settings(max_examples=EXAMPLES_PER_PROPERTY, deadline=None)
@given(case=cases)
@with_examples
def test_producer_and_worker_validation_agree(case) -> None:
    cls, payload = case
    try:
        produced, refused_by_producer = validate_request(cls, payload), None
    except InvalidRequest as exc:
        produced, refused_by_producer = None, exc
    try:
        worked, refused_by_worker = parse_payload(cls, (on_the_wire(payload),), {}), None
    except JobFailedError as exc:
        worked, refused_by_worker = None, exc

    assert (refused_by_producer is None) == (refused_by_worker is None), (
        f"producer: {refused_by_producer or 'accepted'}; worker: {refused_by_worker or 'accepted'}")
    if refused_by_worker is None:
        assert produced == worked
        return
    producer_code, worker_code = refused_by_producer.code, refused_by_worker.code
    assert producer_code is ErrorCode.INVALID_INPUT
    assert worker_code in (ErrorCode.INVALID_INPUT, ErrorCode.UNSUPPORTED_PROTOCOL)
    assert refused_by_worker.error.message
    if worker_code is ErrorCode.UNSUPPORTED_PROTOCOL:
        # The worker checks ``v`` before anything else; where ``v`` is all that is wrong, the producer
        # refuses that same field.
        try:
            cls.model_validate({**payload, "v": PROTOCOL_VERSION})
        except ValidationError:
            pass
        else:
            assert ["v"] in [error["loc"] for error in refused_by_producer.errors]
    elif "errors" in refused_by_worker.error.details:
        # Same validation, same problems (the worker leaves them out only for an oversized payload).
        assert refused_by_worker.error.details["errors"] == refused_by_producer.errors
