"""Request and result models for inference jobs (embed, classify, generate).

A request is sent as the single positional argument of its task; a result is the
task's return value. Both are plain JSON objects with exactly these fields.
"""

from __future__ import annotations

from typing import Annotated, Optional

from pydantic import Field, StrictBool, StrictFloat, StrictInt, StrictStr, field_validator, model_validator

from producer.contract.common import MODEL_NAME_PATTERN, PROTOCOL_VERSION, Limits, WireModel

ModelName = Annotated[StrictStr, Field(pattern=MODEL_NAME_PATTERN)]
Text = Annotated[StrictStr, Field(min_length=1, max_length=Limits.MAX_CHARS_PER_TEXT)]
Probability = Annotated[float, Field(gt=0.0, le=1.0)]


class EmbedRequest(WireModel):
    """Embed ``texts`` with ``model``; vectors are mean-pooled and, if ``normalize``, L2-normalised."""

    v: StrictInt = PROTOCOL_VERSION
    texts: Annotated[list[Text], Field(min_length=1, max_length=Limits.MAX_TEXTS_PER_JOB)]
    model: ModelName = "minilm"
    normalize: StrictBool = True


class EmbedResult(WireModel):
    """One vector per input text, in input order. ``dim`` is the vector length."""

    model: str
    device: str
    dim: int
    vectors: list[list[float]]


#: A feature is a finite number that float32 (what the models compute in) can hold: NaN, infinity and
#: larger numbers are refused here, not turned into NaN scores or an overflow in the worker.
FLOAT32_MAX = 3.4028234663852886e38
Feature = Annotated[StrictFloat | StrictInt, Field(ge=-FLOAT32_MAX, le=FLOAT32_MAX)]
FeatureVector = Annotated[list[Feature], Field(min_length=1, max_length=Limits.MAX_FEATURES_PER_INPUT)]


class ClassifyRequest(WireModel):
    """Classify each input; return the ``top_k`` labels with scores (softmax probabilities).

    Exactly one of ``texts`` (text classifiers) or ``inputs`` (numeric feature vectors, e.g. the
    64 pixel intensities of a digits image for the trained digits MLP/CNN) must be given.
    """

    v: StrictInt = PROTOCOL_VERSION
    texts: Optional[Annotated[list[Text], Field(min_length=1, max_length=Limits.MAX_TEXTS_PER_JOB)]] = None
    inputs: Optional[Annotated[list[FeatureVector], Field(min_length=1, max_length=Limits.MAX_TEXTS_PER_JOB)]] = None
    model: ModelName
    top_k: Annotated[StrictInt, Field(ge=1, le=Limits.MAX_LABELS_RETURNED)] = 1

    @model_validator(mode="after")
    def _exactly_one_input_kind(self) -> "ClassifyRequest":
        if (self.texts is None) == (self.inputs is None):
            raise ValueError("give exactly one of texts or inputs")
        return self

    @property
    def size(self) -> int:
        return len(self.texts if self.texts is not None else self.inputs)


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
    Generation stops early at the first of ``stop`` strings (excluded from the text).
    """

    v: StrictInt = PROTOCOL_VERSION
    prompt: Annotated[StrictStr, Field(min_length=1, max_length=Limits.MAX_PROMPT_CHARS)]
    model: ModelName
    max_new_tokens: Annotated[StrictInt, Field(ge=1, le=Limits.MAX_NEW_TOKENS)] = 64
    temperature: Annotated[StrictFloat | StrictInt, Field(ge=0.0, le=5.0)] = 0.0
    top_p: Probability = 1.0
    #: The range torch.Generator.manual_seed takes; a seed outside it failed in the model, every attempt.
    seed: Optional[Annotated[StrictInt, Field(ge=-(2**63), le=2**64 - 1)]] = None
    stop: Annotated[list[Text], Field(max_length=Limits.MAX_STOP_STRINGS)] = Field(default_factory=list)
    stream: StrictBool = False

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
