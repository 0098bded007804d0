"""The training contract: defaults per kind, validation of every field, JSON round trip, lightness."""

from __future__ import annotations

import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from producer.contract.training import (
    DEFAULTS_FOR_KIND,
    Precision,
    TrainKind,
    TrainProgress,
    TrainRequest,
    TrainResult,
)


def test_importing_the_contract_does_not_import_torch() -> None:
    code = "import sys, producer.contract.training; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("kind", list(TrainKind))
def test_omitted_fields_take_the_kinds_defaults(kind: TrainKind) -> None:
    request = TrainRequest(kind=kind)
    for field, value in DEFAULTS_FOR_KIND[kind].items():
        assert getattr(request, field) == value
    assert request.precision is Precision.FP32 and request.grad_accum_steps == 1
    assert request.betas == (0.9, 0.999) and request.eps == 1e-8 and request.weight_decay == 0.01


def test_explicit_fields_override_defaults() -> None:
    request = TrainRequest(kind="mlp", epochs=3, batch_size=7, learning_rate=0.5, precision="bf16")
    assert (request.epochs, request.batch_size, request.learning_rate) == (3, 7, 0.5)
    assert request.precision is Precision.BF16


def _error(**fields: object) -> str:
    with pytest.raises(ValidationError) as caught:
        TrainRequest(**fields)
    return str(caught.value)


@pytest.mark.parametrize(
    ("fields", "field_name", "message"),
    [
        ({"kind": "gan"}, "kind", "kind 'gan' is not one of mlp, cnn, causal_lm"),
        ({"kind": ["mlp"]}, "kind", "kind ['mlp'] is not one of mlp, cnn, causal_lm"),
        ({"dataset": "digits"}, "kind", "kind is required: one of mlp, cnn, causal_lm"),
        ({"kind": "mlp", "dataset": "imagenet"}, "dataset",
         "dataset 'imagenet' is not one that kind 'mlp' trains on; known: digits"),
        ({"kind": "causal_lm", "dataset": "digits"}, "dataset", "known: corpus"),
        ({"kind": "cnn", "dataset": "corpus"}, "dataset", "known: digits"),
        ({"kind": "mlp", "epochs": 0}, "epochs", "greater than or equal to 1"),
        ({"kind": "mlp", "epochs": 10**6}, "epochs", "less than or equal to 1000"),
        ({"kind": "mlp", "epochs": 2.0}, "epochs", "valid integer"),
        ({"kind": "mlp", "batch_size": 0}, "batch_size", "greater than or equal to 1"),
        ({"kind": "mlp", "batch_size": 5000}, "batch_size", "less than or equal to 4096"),
        ({"kind": "mlp", "learning_rate": -0.1}, "learning_rate", "greater than 0"),
        ({"kind": "mlp", "learning_rate": 0}, "learning_rate", "greater than 0"),
        ({"kind": "mlp", "learning_rate": 2.0}, "learning_rate", "less than or equal to 1"),
        ({"kind": "mlp", "learning_rate": "0.1"}, "learning_rate", "valid"),
        ({"kind": "mlp", "betas": [0.9, 1.0]}, "betas.1", "less than 1"),
        ({"kind": "mlp", "betas": [-0.1, 0.9]}, "betas.0", "greater than or equal to 0"),
        ({"kind": "mlp", "betas": [0.9]}, "betas.1", "Field required"),
        ({"kind": "mlp", "eps": 0.0}, "eps", "greater than 0"),
        ({"kind": "mlp", "weight_decay": -0.01}, "weight_decay", "greater than or equal to 0"),
        ({"kind": "mlp", "grad_accum_steps": 0}, "grad_accum_steps", "greater than or equal to 1"),
        ({"kind": "mlp", "grad_accum_steps": 2048}, "grad_accum_steps", "less than or equal to 1024"),
        ({"kind": "mlp", "precision": "fp8"}, "precision", "Input should be 'fp32', 'bf16' or 'fp16'"),
        ({"kind": "mlp", "seed": -1}, "seed", "greater than or equal to 0"),
        ({"kind": "mlp", "seed": True}, "seed", "valid integer"),
        ({"kind": "mlp", "checkpoint_every_steps": 0}, "checkpoint_every_steps", "greater than or equal to 1"),
        ({"kind": "mlp", "eval_fraction": 0.0}, "eval_fraction", "greater than 0"),
        ({"kind": "mlp", "eval_fraction": 0.5}, "eval_fraction", "less than 0.5"),
        ({"kind": "mlp", "register_as": "Bad Name"}, "register_as", "should match pattern"),
        ({"kind": "mlp", "learning_rat": 0.1}, "learning_rat", "Extra inputs are not permitted"),
    ],
)
def test_invalid_requests_name_the_field_and_the_reason(fields: dict, field_name: str, message: str) -> None:
    text = _error(**fields)
    assert field_name in text and message in text, text


def test_an_unknown_kind_is_the_only_error_reported() -> None:
    with pytest.raises(ValidationError) as caught:
        TrainRequest(kind="gan", epochs=0)
    assert caught.value.error_count() == 1


def test_requests_are_immutable() -> None:
    request = TrainRequest(kind="mlp")
    with pytest.raises(ValidationError):
        request.epochs = 5  # type: ignore[misc]


@settings(max_examples=50, deadline=None)
@given(
    kind=st.sampled_from(list(TrainKind)),
    epochs=st.integers(1, 1000),
    batch_size=st.integers(1, 4096),
    learning_rate=st.floats(1e-6, 1.0),
    betas=st.tuples(st.floats(0.0, 0.999), st.floats(0.0, 0.999)),
    grad_accum_steps=st.integers(1, 1024),
    precision=st.sampled_from(list(Precision)),
    seed=st.integers(0, 2**32 - 1),
    eval_fraction=st.floats(0.01, 0.49),
    register_as=st.none() | st.from_regex(r"[a-z0-9][a-z0-9_\-]{0,20}", fullmatch=True),
)
def test_valid_requests_round_trip_through_json(**fields: object) -> None:
    request = TrainRequest(**fields)
    assert TrainRequest.model_validate_json(request.model_dump_json()) == request


def test_progress_and_result_round_trip_through_json() -> None:
    progress = TrainProgress(
        epoch=1, epochs=2, step=3, total_steps=10, loss=0.5, learning_rate=1e-3, samples_per_s=100.0, eta_s=7.0
    )
    assert TrainProgress.model_validate_json(progress.model_dump_json()) == progress
    result = TrainResult(
        kind="mlp", dataset="digits", device="cpu", metrics={"accuracy": 0.98}, loss_curve=[2.3, 1.1],
        steps=2, resumed_from_step=0, artifact="/models/job", cancelled=False,
    )
    assert TrainResult.model_validate_json(result.model_dump_json()) == result
