"""Request and result models for inference jobs (embed, classify, generate).

A request is sent as the single positional argument of its task; a result is the
task's return value. Both are plain JSON objects with exactly these fields.
"""

from __future__ import annotations

import binascii
import math
import sys
from array import array
from typing import Annotated, Any, Literal, get_args

from pydantic import (
    AfterValidator,
    Field,
    SerializerFunctionWrapHandler,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    field_validator,
    model_serializer,
    model_validator,
)

from producer.contract.common import PROTOCOL_VERSION, Finite, Limits, ModelRef, WireModel

Text = Annotated[StrictStr, Field(min_length=1, max_length=Limits.MAX_CHARS_PER_TEXT)]
Probability = Annotated[StrictFloat | StrictInt, Finite, Field(gt=0.0, le=1.0)]


#: How an ``EmbedResult`` carries its vectors. ``"float"``: JSON arrays of numbers (``vectors``).
#: ``"base64"``: each vector as its ``dim`` float32 values, little-endian, ``4 * dim`` bytes, base64-encoded
#: with the standard alphabet and ``=`` padding (RFC 4648 section 4), one string per vector (``vectors_b64``).
#: The same bytes as OpenAI's ``encoding_format: "base64"``; no float is formatted or parsed on either side.
EmbedEncoding = Literal["float", "base64"]
EMBED_ENCODINGS: tuple[str, ...] = get_args(EmbedEncoding)


class EmbedRequest(WireModel):
    """Embed ``texts`` with ``model``; vectors are mean-pooled and, if ``normalize``, L2-normalised.

    ``encoding`` picks how the result carries them (``EmbedEncoding``): ``"float"`` (default) or
    ``"base64"`` (little-endian float32 bytes, base64: far cheaper to produce and parse for big jobs).
    """

    v: StrictInt = PROTOCOL_VERSION
    texts: Annotated[list[Text], Field(min_length=1, max_length=Limits.MAX_TEXTS_PER_JOB)]
    model: ModelRef = "minilm"
    normalize: StrictBool = True
    encoding: EmbedEncoding = "float"


class EmbedResult(WireModel):
    """One vector per input text, in input order. ``dim`` is the vector length.

    Exactly one of ``vectors`` (``encoding == "float"``: lists of numbers) and ``vectors_b64``
    (``encoding == "base64"``: one base64 string of ``4 * dim`` little-endian float32 bytes per
    vector) is set; on the wire the other is absent. Whatever the encoding:

    * ``float_vectors()``: ``list[list[float]]`` (decoded for base64; the float32 values exactly);
    * ``as_bytes()``: per vector its ``4 * dim`` little-endian float32 bytes, e.g. for NumPy:
      ``np.frombuffer(b"".join(result.as_bytes()), "<f4").reshape(-1, result.dim)``;
    * ``as_arrays()``: per vector an ``array.array("f")`` (native byte order).

    A result without ``encoding`` (an older worker, a plain Celery worker) is ``"float"``.
    """

    model: str
    device: str
    dim: int
    encoding: EmbedEncoding = "float"
    vectors: list[list[float]] | None = None
    vectors_b64: list[StrictStr] | None = None

    @model_validator(mode="after")
    def _vectors_match_encoding(self) -> EmbedResult:
        if self.encoding == "float":
            if self.vectors is None or self.vectors_b64 is not None:
                raise ValueError('encoding "float" carries its vectors in vectors (and no vectors_b64)')
            for index, vector in enumerate(self.vectors):
                if len(vector) != self.dim:
                    raise ValueError(f"vectors[{index}] has {len(vector)} values, dim is {self.dim}")
        else:
            if self.vectors_b64 is None or self.vectors is not None:
                raise ValueError('encoding "base64" carries its vectors in vectors_b64 (and no vectors)')
            for index, text in enumerate(self.vectors_b64):
                size = len(_b64_bytes(text, f"vectors_b64[{index}]"))
                if size != 4 * self.dim:
                    raise ValueError(f"vectors_b64[{index}] decodes to {size} bytes, expected 4 * dim = "
                                     f"{4 * self.dim} (float32)")
        return self

    @model_serializer(mode="wrap")
    def _leave_out_unused_field(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        """On the wire the vectors field the encoding does not use is absent, not null."""
        data: dict[str, Any] = handler(self)
        data.pop("vectors_b64" if self.encoding == "float" else "vectors", None)
        return data

    def float_vectors(self) -> list[list[float]]:
        """Every vector as a list of floats, whatever the encoding (base64 is decoded here)."""
        if self.vectors is not None:
            return self.vectors
        return [vector.tolist() for vector in self.as_arrays()]

    def as_arrays(self) -> list[array[float]]:
        """Every vector as an ``array.array("f")`` (float32, native byte order)."""
        if self.vectors is not None:
            return [array("f", vector) for vector in self.vectors]
        return [_float32_array(_b64_bytes(text)) for text in self.vectors_b64 or []]

    def as_bytes(self) -> list[bytes]:
        """Every vector as its ``4 * dim`` bytes of little-endian float32 (base64: just decoded)."""
        if self.vectors_b64 is not None:
            return [_b64_bytes(text) for text in self.vectors_b64]
        return [_le_float32_bytes(vector) for vector in self.as_arrays()]


def encode_vector_b64(vector: list[float] | array[float]) -> str:
    """One vector as ``EmbedEncoding`` ``"base64"`` text (float32, little-endian, standard base64)."""
    return binascii.b2a_base64(_le_float32_bytes(array("f", vector)), newline=False).decode("ascii")


def decode_vector_b64(text: str) -> list[float]:
    """The floats of one ``"base64"``-encoded vector (each exactly its float32 value).

    Raises ``ValueError`` for text that is not strict padded base64 or not a whole number of float32s.
    """
    return _float32_array(_b64_bytes(text)).tolist()


def _float32_array(raw: bytes) -> array[float]:
    """Little-endian float32 bytes -> ``array("f")`` in native byte order."""
    if len(raw) % 4:
        raise ValueError(f"{len(raw)} bytes is not a whole number of float32 values")
    vector = array("f")
    vector.frombytes(raw)
    if sys.byteorder == "big":
        vector.byteswap()
    return vector


def _le_float32_bytes(vector: array[float]) -> bytes:
    if sys.byteorder == "big":
        vector = array("f", vector)
        vector.byteswap()
    return vector.tobytes()


def _b64_bytes(text: str, where: str = "vector") -> bytes:
    """Strict standard base64 (alphabet ``A-Z a-z 0-9 + /``, ``=`` padding, no whitespace) -> bytes."""
    try:
        raw = binascii.a2b_base64(text, strict_mode=True)
    except ValueError as exc:  # binascii.Error, or a non-ASCII character
        raise ValueError(f"{where} is not standard padded base64: {exc}") from None
    if len(text) != 4 * ((len(raw) + 2) // 3):  # strict mode lets surplus "=" through
        raise ValueError(f"{where} is not standard padded base64: {len(text)} characters for {len(raw)} bytes")
    return raw


#: A feature is a finite number that float32 (what the models compute in) can hold: NaN, infinity and
#: larger numbers are refused here, not turned into NaN scores or an overflow in the worker.
FLOAT32_MAX = 3.4028234663852886e38


def _features_fit_float32(vector: list[float | int]) -> list[float | int]:
    """One error per vector, naming its first bad feature: "not a finite number" for NaN and the
    infinities, "outside the float32 range" for numbers float32 cannot hold."""
    bad = [(index, value) for index, value in enumerate(vector) if not _fits_float32(value)]
    if bad:
        index, value = bad[0]
        problem = ("outside the float32 range (-3.4028235e38 to 3.4028235e38)"
                   if isinstance(value, int) or math.isfinite(value) else "not a finite number")
        more = f"; {len(bad) - 1} more feature(s) of this input too" if len(bad) > 1 else ""
        raise ValueError(f"feature {index} is {problem}: {repr(value)[:32]}{more}")
    return vector


def _fits_float32(value: float | int) -> bool:
    return abs(value) <= FLOAT32_MAX  # False for NaN; exact for integers of any size


FeatureVector = Annotated[list[StrictFloat | StrictInt], Field(min_length=1, max_length=Limits.MAX_FEATURES_PER_INPUT),
                          AfterValidator(_features_fit_float32)]


class ClassifyRequest(WireModel):
    """Classify each input; return the ``top_k`` labels with scores (softmax probabilities).

    Exactly one of ``texts`` (text classifiers) or ``inputs`` (numeric feature vectors, e.g. the
    64 pixel intensities of a digits image for the trained digits MLP/CNN) must be given.
    """

    v: StrictInt = PROTOCOL_VERSION
    texts: Annotated[list[Text], Field(min_length=1, max_length=Limits.MAX_TEXTS_PER_JOB)] | None = None
    inputs: Annotated[list[FeatureVector], Field(min_length=1, max_length=Limits.MAX_TEXTS_PER_JOB)] | None = None
    model: ModelRef
    top_k: Annotated[StrictInt, Field(ge=1, le=Limits.MAX_LABELS_RETURNED)] = 1

    @model_validator(mode="after")
    def _exactly_one_input_kind(self) -> ClassifyRequest:
        if (self.texts is None) == (self.inputs is None):
            raise ValueError("give exactly one of texts or inputs")
        return self

    @property
    def size(self) -> int:
        return len(self.texts if self.texts is not None else self.inputs or [])


class LabelScore(WireModel):
    label: str
    score: float


class ClassifyResult(WireModel):
    """For each input text, its labels sorted by descending score."""

    model: str
    device: str
    predictions: list[list[LabelScore]]


class GenerateRequest(WireModel):
    """Continue ``prompt`` with up to ``max_new_tokens`` tokens.

    ``temperature == 0`` means greedy decoding; otherwise sampling with ``top_p`` and ``seed``.
    Generation stops as soon as the text contains one of the ``stop`` strings; the text ends
    right before it. A prompt longer than the model's room for it (the smaller of its longest
    prompt and ``max_seq_len - max_new_tokens`` tokens) fails with ``prompt_too_long``, unless
    ``truncate``: then the start of the prompt is dropped (a leading BOS token stays) and its end,
    which the continuation follows, is kept.
    """

    v: StrictInt = PROTOCOL_VERSION
    prompt: Annotated[StrictStr, Field(min_length=1, max_length=Limits.MAX_PROMPT_CHARS)]
    model: ModelRef
    max_new_tokens: Annotated[StrictInt, Field(ge=1, le=Limits.MAX_NEW_TOKENS)] = 64
    temperature: Annotated[StrictFloat | StrictInt, Finite, Field(ge=0.0, le=5.0)] = 0.0
    top_p: Probability = 1.0
    #: The range torch.Generator.manual_seed takes; a seed outside it failed in the model, every attempt.
    seed: Annotated[StrictInt, Field(ge=-2 ** 63, le=2 ** 64 - 1)] | None = None
    stop: Annotated[list[Text], Field(max_length=Limits.MAX_STOP_STRINGS)] = Field(default_factory=list)
    stream: StrictBool = False
    truncate: StrictBool = False

    @field_validator("prompt")
    @classmethod
    def _prompt_not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("prompt must contain a non-whitespace character")
        return value


class GenerateResult(WireModel):
    """The generated continuation (prompt excluded) and why generation ended."""

    model: str
    device: str
    text: str
    tokens_generated: int
    finish_reason: str  # "length" | "stop" | "eos"
