"""The worker's result backend writes strict JSON: a NaN or an infinity can never be stored."""

from __future__ import annotations

import json
import math

import pytest
from kombu.exceptions import EncodeError

from workers.queue.app import app


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_a_non_finite_number_cannot_be_encoded_as_a_result(value):
    with pytest.raises(EncodeError, match="not JSON compliant"):
        app.backend.encode({"status": "SUCCESS", "result": {"scores": [0.5, {"score": value}]}})


def test_results_stay_plain_json():
    assert app.backend.content_type == "application/json"
    encoded = app.backend.encode({"score": 0.5, "labels": ["a"], "n": 3})
    assert json.loads(encoded) == {"score": 0.5, "labels": ["a"], "n": 3}
