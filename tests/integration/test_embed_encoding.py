"""``EmbedRequest.encoding``: vectors as JSON floats or as base64 of their little-endian float32 bytes.

Unit tests of the contract and its decode helpers (no Redis), then the same texts through a real
worker process in both encodings, and bad encodings refused at the client and on the wire.
"""

from __future__ import annotations

import asyncio
import base64
import json
import math
import random
import struct

import pytest
from pydantic import ValidationError

from producer import AsyncFleetClient, ErrorCode, InvalidRequest, JobFailedError
from producer.contract import TASK_EMBED, EmbedRequest, EmbedResult, inference_queue
from producer.contract.inference import EMBED_ENCODINGS, decode_vector_b64, encode_vector_b64
from producer.queues import queue_depth

QUEUE = inference_queue("embed", "minilm")
TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "short",
    "Quarterly revenue grew by eight percent, beating every forecast the analysts had published.",
    "A much longer sentence that rambles on for a while so that the batch holds inputs of quite different "
    "lengths, which exercises padding and the attention mask in mean pooling.",
]


def float32(value: float) -> float:
    """``value`` rounded to the nearest float32, as a Python float."""
    return struct.unpack("<f", struct.pack("<f", value))[0]


def cosine(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b))
    return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))


def norm(vector: list[float]) -> float:
    return math.sqrt(sum(x * x for x in vector))


# --- the byte layout and the decode helpers (pure) ------------------------------------------------


def test_byte_layout_is_little_endian_float32_standard_base64():
    vector = [1.0, -2.0, 0.5]
    text = encode_vector_b64(vector)
    assert text == base64.b64encode(struct.pack("<3f", *vector)).decode() == "AACAPwAAAMAAAAA/"
    assert decode_vector_b64(text) == vector
    # 384 floats: 1536 bytes, 2048 characters, no padding needed; 2 floats: 8 bytes, one "=".
    assert len(encode_vector_b64([0.0] * 384)) == 2048
    assert encode_vector_b64([1.0, 2.5]) == "AACAPwAAIEA="


def test_decode_gives_the_float32_values_exactly():
    rng = random.Random(7)
    values = [rng.uniform(-3, 3) for _ in range(768)] + [0.0, -0.0, 1e-45, 3.4028234663852886e38, -1.5e-39]
    decoded = decode_vector_b64(encode_vector_b64(values))
    assert decoded == [float32(v) for v in values]
    assert math.copysign(1.0, decoded[769]) == -1.0  # -0.0 keeps its sign


@pytest.mark.parametrize("text, problem", [
    ("AACAPwAAIEA", "padding"),            # padding left out
    ("AACAPwAAIEA===", "padding"),         # surplus padding
    ("AACAPwAAIEAAAAAA====", "characters"),  # a whole padding group too many
    ("AACA PwAAIEA=", "base64"),           # whitespace
    ("AACAPwAAIEA=\n", "base64"),          # a trailing newline
    ("AACA-wAAIEA=", "base64"),            # URL-safe alphabet
    ("AACAPw\u00e9AIEA=", "base64"),       # not ASCII
    ("AACAPwAA", "whole number"),          # 6 bytes: not a whole number of float32s
])
def test_decode_refuses_anything_but_strict_padded_base64_of_whole_floats(text, problem):
    with pytest.raises(ValueError, match=problem):
        decode_vector_b64(text)


# --- the contract (pure) --------------------------------------------------------------------------


def test_request_encoding_defaults_to_float_and_takes_base64():
    assert EMBED_ENCODINGS == ("float", "base64")
    assert EmbedRequest(texts=["a"]).encoding == "float"
    request = EmbedRequest.model_validate({"texts": ["a"], "encoding": "base64"})
    assert request.model_dump(mode="json")["encoding"] == "base64"


@pytest.mark.parametrize("encoding", ["BASE64", "binary", "float32", "", None, 1, True, ["base64"]])
def test_request_refuses_other_encodings(encoding):
    with pytest.raises(ValidationError) as raised:
        EmbedRequest.model_validate({"texts": ["a"], "encoding": encoding})
    assert [error["loc"] for error in raised.value.errors()] == [("encoding",)]
    assert "'float' or 'base64'" in str(raised.value)


def test_result_carries_exactly_the_field_of_its_encoding_on_the_wire():
    as_float = EmbedResult(model="m", device="cpu", dim=2, vectors=[[1.0, 2.5], [-1.0, 0.25]])
    as_b64 = EmbedResult(model="m", device="cpu", dim=2, encoding="base64",
                         vectors_b64=[encode_vector_b64([1.0, 2.5]), encode_vector_b64([-1.0, 0.25])])
    assert as_float.model_dump(mode="json") == {"model": "m", "device": "cpu", "dim": 2, "encoding": "float",
                                                "vectors": [[1.0, 2.5], [-1.0, 0.25]]}
    assert as_b64.model_dump(mode="json") == {"model": "m", "device": "cpu", "dim": 2, "encoding": "base64",
                                              "vectors_b64": ["AACAPwAAIEA=", "AACAvwAAgD4="]}
    assert json.loads(as_b64.model_dump_json()) == as_b64.model_dump(mode="json")
    for result in (as_float, as_b64):
        assert EmbedResult.model_validate(json.loads(result.model_dump_json())) == result
        assert result.float_vectors() == [[1.0, 2.5], [-1.0, 0.25]]
        assert result.as_bytes() == [struct.pack("<2f", 1.0, 2.5), struct.pack("<2f", -1.0, 0.25)]
        assert [list(array) for array in result.as_arrays()] == [[1.0, 2.5], [-1.0, 0.25]]
    assert as_b64.vectors is None and as_float.vectors_b64 is None


def test_result_without_encoding_is_float():
    """What an older worker, or a plain Celery worker (bench/baseline_app.py), returns."""
    result = EmbedResult.model_validate({"model": "m", "device": "cpu", "dim": 1, "vectors": [[0.5]]})
    assert result.encoding == "float" and result.float_vectors() == [[0.5]]


@pytest.mark.parametrize("fields, problem", [
    ({"encoding": "base64", "vectors": [[1.0, 2.0]]}, "vectors_b64"),
    ({"encoding": "float", "vectors_b64": ["AACAPwAAIEA="]}, "carries its vectors in vectors"),
    ({"encoding": "float", "vectors": [[1.0, 2.0]], "vectors_b64": ["AACAPwAAIEA="]}, "no vectors_b64"),
    ({"encoding": "base64", "vectors": [[1.0, 2.0]], "vectors_b64": ["AACAPwAAIEA="]}, "and no vectors"),
    ({"encoding": "base64"}, "vectors_b64"),
    ({}, "vectors"),
    ({"encoding": "float", "vectors": [[1.0, 2.0], [1.0]]}, r"vectors\[1\] has 1 values, dim is 2"),
    ({"encoding": "base64", "vectors_b64": ["AACAPwAAIEA=", "AACAPw=="]}, r"vectors_b64\[1\] decodes to 4 bytes"),
    ({"encoding": "base64", "vectors_b64": ["AACAPwAAIEA"]}, r"vectors_b64\[0\] is not standard padded base64"),
    ({"encoding": "base64", "vectors_b64": [[1.0, 2.0]]}, "string"),
    ({"encoding": "hex", "vectors": [[1.0, 2.0]]}, "'float' or 'base64'"),
])
def test_result_validation_is_strict_with_clear_errors(fields, problem):
    with pytest.raises(ValidationError, match=problem):
        EmbedResult.model_validate({"model": "m", "device": "cpu", "dim": 2, **fields})


def test_worker_base64_is_the_float_path_bit_for_bit():
    """The worker's two finishing steps on the same pooled vectors: identical float32 values."""
    torch = pytest.importorskip("torch")
    from workers.serving.models.embedder import finish_vectors, finish_vectors_b64

    pooled = list((torch.randn(7, 384, generator=torch.Generator().manual_seed(3)) * 4).unbind(0))
    for normalize in (True, False):
        floats = finish_vectors(pooled, normalize)
        texts = finish_vectors_b64(pooled, normalize)
        assert len(texts) == 7 and all(len(base64.b64decode(text)) == 4 * 384 for text in texts)
        assert [decode_vector_b64(text) for text in texts] == floats  # float32 values, as doubles: exact
        assert texts == [encode_vector_b64(vector) for vector in floats]


# --- through a real worker ------------------------------------------------------------------------


@pytest.mark.integration
@pytest.mark.parametrize("normalize", [True, False])
def test_base64_and_float_results_of_the_same_texts_agree(embed_worker, client, normalize):
    floats = client.embed(TEXTS, normalize=normalize).result(timeout=120)
    packed = client.embed(TEXTS, normalize=normalize, encoding="base64").result(timeout=120)
    assert isinstance(packed, EmbedResult)
    assert floats.encoding == "float" and packed.encoding == "base64"
    assert packed.vectors is None and len(packed.vectors_b64) == len(TEXTS)
    assert packed.dim == floats.dim == 384 and packed.model == "minilm" and packed.device == "cpu"
    assert all(len(raw) == 4 * 384 for raw in packed.as_bytes())
    decoded = packed.float_vectors()
    assert all(len(vector) == 384 for vector in decoded)
    for got, want in zip(decoded, floats.vectors):
        assert cosine(got, want) >= 0.9999
        # Each job alone, the same texts: the same forward pass, so the same float32 values.
        assert got == [float32(x) for x in want]
    norms = [norm(vector) for vector in decoded]
    if normalize:
        assert all(abs(n - 1.0) < 1e-5 for n in norms)
    else:
        assert all(abs(n - 1.0) > 1e-3 for n in norms)


@pytest.mark.integration
def test_embed_many_and_gather_in_base64(embed_worker, client):
    jobs = [TEXTS, TEXTS[:1], TEXTS[::-1] * 8]
    results = client.gather(client.embed_many(jobs, encoding="base64"), timeout=180)
    singles = {text: client.embed([text]).result(timeout=120).vectors[0] for text in TEXTS}
    for texts, result in zip(jobs, results):
        assert isinstance(result, EmbedResult) and result.encoding == "base64"
        assert len(result.vectors_b64) == len(texts)
        for text, vector in zip(texts, result.float_vectors()):
            assert cosine(vector, singles[text]) >= 0.9999


@pytest.mark.integration
def test_async_client_embeds_in_base64(embed_worker, client, redis_url):
    expected = client.embed(TEXTS).result(timeout=120)

    async def main():
        async with AsyncFleetClient(redis_url) as fleet:
            one = await (await fleet.embed(TEXTS, encoding="base64")).result(timeout=120)
            many = await fleet.gather(await fleet.embed_many([TEXTS[:2]], encoding="base64"), timeout=120)
            return one, many

    one, many = asyncio.run(main())
    assert one.encoding == "base64" and many[0].encoding == "base64" and len(many[0].vectors_b64) == 2
    for got, want in zip(one.float_vectors(), expected.vectors):
        assert cosine(got, want) >= 0.9999


@pytest.mark.integration
def test_plain_celery_client_gets_the_documented_base64_result(embed_worker, raw_app, redis_client):
    job = raw_app.send_task(TASK_EMBED, args=[{"texts": ["Hello, fleet!"], "encoding": "base64"}], queue=QUEUE)
    result = job.get(timeout=60)
    assert job.state == "SUCCESS"
    assert set(result) == {"model", "device", "dim", "encoding", "vectors_b64"}
    assert result["encoding"] == "base64" and result["dim"] == 384
    vector = struct.unpack("<384f", base64.b64decode(result["vectors_b64"][0], validate=True))
    assert abs(norm(vector) - 1.0) < 1e-5
    stored = json.loads(redis_client.get(f"celery-task-meta-{job.id}"))["result"]
    assert "vectors" not in stored and stored["vectors_b64"] == result["vectors_b64"]


@pytest.mark.integration
@pytest.mark.parametrize("encoding", ["BASE64", "binary", None, 64])
def test_client_refuses_a_bad_encoding_before_enqueue(encoding, client, redis_client, embed_worker):
    keys_before = set(redis_client.keys("fleet:job:*"))
    with pytest.raises(InvalidRequest) as raised:
        client.embed(["hello"], encoding=encoding)
    assert raised.value.code is ErrorCode.INVALID_INPUT
    assert [error["loc"] for error in raised.value.errors] == [["encoding"]]
    assert "encoding" in str(raised.value)
    with pytest.raises(InvalidRequest, match="job 0: .*encoding"):
        client.embed_many([["fine"], ["also fine"]], encoding=encoding)
    assert set(redis_client.keys("fleet:job:*")) == keys_before
    assert queue_depth(redis_client, QUEUE) == 0


@pytest.mark.integration
@pytest.mark.parametrize("encoding", ["BASE64", "binary", None, 64])
def test_worker_refuses_a_bad_encoding_on_the_wire(encoding, raw_app, client, embed_worker):
    job = raw_app.send_task(TASK_EMBED, args=[{"texts": ["a"], "encoding": encoding}], queue=QUEUE)
    job.get(timeout=60, propagate=False)
    assert job.state == "FAILURE"
    with pytest.raises(JobFailedError) as raised:
        client.job(job.id).result(timeout=60)
    assert raised.value.code is ErrorCode.INVALID_INPUT
    assert [error["loc"] for error in raised.value.error.details["errors"]] == [["encoding"]]
    assert embed_worker.alive()
    assert client.embed(["the next job is fine"], encoding="base64").result(timeout=60).dim == 384
