"""orjson as kombu's ``json`` serializer: the same JSON any Celery client reads (producer/serialization.py)."""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime
from decimal import Decimal

import numpy as np
import pytest
from kombu import serialization as kombu_serialization
from kombu.utils import json as kombu_json

from producer import serialization


@pytest.fixture(autouse=True, scope="module")
def installed():
    serialization.install()


def test_kombu_json_is_orjson_with_the_standard_content_type():
    content_type, encoding, payload = kombu_serialization.dumps({"a": [1, 2.5, "x"]}, serializer="json")
    assert (content_type, encoding) == ("application/json", "utf-8")
    assert json.loads(payload) == {"a": [1, 2.5, "x"]}
    assert kombu_serialization.loads(payload, content_type, encoding) == {"a": [1, 2.5, "x"]}


def test_float32_vectors_are_written_with_digits_that_give_back_the_same_float32():
    rows = np.random.default_rng(1).standard_normal((3, 64)).astype(np.float32)
    parsed = json.loads(serialization.dumps({"vectors": rows}))["vectors"]
    assert np.array_equal(np.asarray(parsed, dtype=np.float32), rows)


def test_what_orjson_cannot_write_is_written_by_kombu():
    value = {"big": 2**70, "when": datetime(2026, 12, 4, tzinfo=UTC), "amount": Decimal("1.5")}
    assert serialization.loads(serialization.dumps(value)) == kombu_json.loads(kombu_json.dumps(value))


def test_documents_orjson_refuses_are_read_by_kombu():
    assert math.isnan(serialization.loads(b'{"x": NaN}')["x"])
    assert serialization.loads(b'{"n": 18446744073709551616}')["n"] == 2**64


def test_kombus_typed_values_are_read_back_as_their_types():
    encoded = kombu_json.dumps({"when": datetime(2026, 1, 2, 3, 4, 5)})
    assert serialization.loads(encoded)["when"] == datetime(2026, 1, 2, 3, 4, 5)


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_the_strict_form_refuses_non_finite_numbers_anywhere(value):
    with pytest.raises(ValueError, match="not JSON compliant"):
        serialization.dumps_strict({"result": {"scores": [0.1, [value]]}})
    assert serialization.dumps_strict({"result": [0.5]}) == b'{"result":[0.5]}'
