"""Request, progress and result models for training jobs (MLP, CNN, tiny causal LM).

A ``TrainRequest`` is sent as the single positional argument of ``fleet.train`` on the
training queue; the task reports ``TrainProgress`` while it runs and returns a
``TrainResult``. This module must stay light: it never imports torch.

Fields left out of a request take the defaults of its kind (``DEFAULTS_FOR_KIND``), chosen
so that each kind reaches its quality bar on one CPU in well under a minute.
"""

from __future__ import annotations

from enum import Enum
from typing import Annotated, Any

from pydantic import (
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    ValidationInfo,
    field_validator,
    model_validator,
)

from producer.contract.common import PROTOCOL_VERSION, Finite, ModelRef, WireModel
from producer.contract.lifecycle import ModelCommandReply, ServeOn

__all__ = [
    "TrainKind", "Precision", "DATASETS_FOR_KIND", "DEFAULTS_FOR_KIND", "MAX_LOSS_CURVE_POINTS",
    "ONNX_EXPORTABLE_KINDS",
    "TrainRequest", "TrainProgress", "TrainResult",
]

#: A ``TrainResult.loss_curve`` holds at most this many points (see ``TrainResult``).
MAX_LOSS_CURVE_POINTS = 1000


class TrainKind(str, Enum):
    """What a training job builds."""

    MLP = "mlp"              # three-layer perceptron, image classifier
    CNN = "cnn"              # ResNet-18-style residual network, image classifier
    CAUSAL_LM = "causal_lm"  # tiny Llama-architecture language model


class Precision(str, Enum):
    """Arithmetic of the forward pass. ``bf16`` and ``fp16`` use autocast over fp32 weights;
    ``fp16`` adds a gradient scaler and is allowed on CUDA devices only (checked by the worker)."""

    FP32 = "fp32"
    BF16 = "bf16"
    FP16 = "fp16"


#: The datasets each kind can train on. ``digits``: the 1797 8x8 handwritten digits of
#: scikit-learn (10 classes); ``corpus``: the English fables kept in the worker package.
DATASETS_FOR_KIND: dict[TrainKind, tuple[str, ...]] = {
    TrainKind.MLP: ("digits",),
    TrainKind.CNN: ("digits",),
    TrainKind.CAUSAL_LM: ("corpus",),
}

#: The kinds whose finished model ``export_onnx`` can export (classifiers; text generation is not exported).
ONNX_EXPORTABLE_KINDS = (TrainKind.MLP, TrainKind.CNN)

#: Values a request of each kind takes for the fields it leaves out.
DEFAULTS_FOR_KIND: dict[TrainKind, dict[str, Any]] = {
    TrainKind.MLP: {"dataset": "digits", "epochs": 30, "batch_size": 64, "learning_rate": 1e-2},
    TrainKind.CNN: {"dataset": "digits", "epochs": 16, "batch_size": 64, "learning_rate": 3e-3},
    TrainKind.CAUSAL_LM: {"dataset": "corpus", "epochs": 8, "batch_size": 4, "learning_rate": 1e-3},
}

Beta = Annotated[StrictFloat | StrictInt, Finite, Field(ge=0.0, lt=1.0)]


class TrainRequest(WireModel):
    """Train a model of ``kind`` on ``dataset`` with AdamW (``weight_decay`` applies to weight
    matrices and kernels, not to biases or norm scales).

    The learning rate warms up linearly over the first 5% of optimizer steps to
    ``learning_rate``, then decays along a cosine to a tenth of it. One optimizer step
    consumes ``batch_size * grad_accum_steps`` samples (an image, or one block of tokens
    for the LM), taken as ``grad_accum_steps`` micro-batches of ``batch_size``.
    ``eval_fraction`` of the dataset is held out (stratified by class for images; whole
    fables for the LM) and never trained on. The worker writes a checkpoint every
    ``checkpoint_every_steps`` optimizer steps and resumes from the newest one when the
    same job runs again. With ``register_as`` the finished model is registered for
    serving under that name (a name, or ``name@version``), and with ``serve_on`` (``cpu``, ``cuda``,
    ``mps`` or ``any``) the running workers started with ``--serve-trained`` on such a device load it
    as soon as it is registered, without a restart. With ``export_onnx`` (``mlp`` and ``cnn`` only) the finished model
    is also exported to ONNX (fp32, checked against PyTorch) beside it, and ``register_as``
    then serves that export with ONNX Runtime.
    """

    v: StrictInt = PROTOCOL_VERSION
    kind: TrainKind
    dataset: StrictStr
    epochs: Annotated[StrictInt, Field(ge=1, le=1000)]
    batch_size: Annotated[StrictInt, Field(ge=1, le=4096)]
    learning_rate: Annotated[StrictFloat | StrictInt, Finite, Field(gt=0.0, le=1.0)]
    betas: tuple[Beta, Beta] = (0.9, 0.999)
    eps: Annotated[StrictFloat | StrictInt, Finite, Field(gt=0.0, le=1.0)] = 1e-8
    weight_decay: Annotated[StrictFloat | StrictInt, Finite, Field(ge=0.0, le=10.0)] = 0.01
    grad_accum_steps: Annotated[StrictInt, Field(ge=1, le=1024)] = 1
    precision: Precision = Precision.FP32
    seed: Annotated[StrictInt, Field(ge=0, le=2**32 - 1)] = 0
    checkpoint_every_steps: Annotated[StrictInt, Field(ge=1)] = 50
    eval_fraction: Annotated[StrictFloat, Finite, Field(gt=0.0, lt=0.5)] = 0.2
    register_as: ModelRef | None = None
    export_onnx: StrictBool = False
    serve_on: ServeOn | None = None

    @model_validator(mode="before")
    @classmethod
    def _fill_kind_defaults(cls, data: Any) -> Any:
        """Check the kind first (every other field depends on it), then fill the fields the
        request leaves out with that kind's defaults."""
        if not isinstance(data, dict):
            return data
        known = ", ".join(kind.value for kind in TrainKind)
        if "kind" not in data:
            raise ValueError(f"kind is required: one of {known}")
        try:
            kind = TrainKind(data["kind"])
        except ValueError:
            raise ValueError(f"kind {data['kind']!r} is not one of {known}") from None
        return {**DEFAULTS_FOR_KIND[kind], **data}

    @field_validator("dataset")
    @classmethod
    def _dataset_fits_kind(cls, value: str, info: ValidationInfo) -> str:
        kind = info.data["kind"]
        known = DATASETS_FOR_KIND[kind]
        if value not in known:
            raise ValueError(
                f"dataset {value!r} is not one that kind {kind.value!r} trains on; known: {', '.join(known)}"
            )
        return value

    @model_validator(mode="after")
    def _serve_on_needs_a_name(self) -> TrainRequest:
        if self.serve_on is not None and self.register_as is None:
            raise ValueError("serve_on needs register_as: the name the trained model is served under")
        return self

    @model_validator(mode="after")
    def _export_fits_kind(self) -> TrainRequest:
        if self.export_onnx and self.kind not in ONNX_EXPORTABLE_KINDS:
            known = ", ".join(kind.value for kind in ONNX_EXPORTABLE_KINDS)
            raise ValueError(f"export_onnx is for kinds {known}; a {self.kind.value} model is served by PyTorch only")
        return self


class TrainProgress(WireModel):
    """A running job's position. ``epoch`` counts from 1; ``step`` counts optimizer steps
    done so far out of ``total_steps``; ``loss`` is the mean training loss of the latest
    step; ``samples_per_s`` is measured over this run (not counting resumed steps);
    ``eta_s`` is the estimated number of seconds until training ends."""

    epoch: int
    epochs: int
    step: int
    total_steps: int
    loss: float
    learning_rate: float
    samples_per_s: float
    eta_s: float


class TrainResult(WireModel):
    """What a training job produced.

    ``metrics`` holds the held-out evaluation of the final model: ``val_loss`` (mean
    cross-entropy in nats, per image or per predicted token) and ``val_loss_start`` (the
    same before the first step) for every kind, ``accuracy`` (0..1) for the classifiers,
    and ``train_seconds`` (wall time of this run). ``loss_curve`` holds the mean training
    loss of every optimizer step, from step 1 (resumed runs include the steps done before
    the interruption), while ``steps`` is at most ``MAX_LOSS_CURVE_POINTS``; past that, each
    point is the mean of ``s = ceil(steps / MAX_LOSS_CURVE_POINTS)`` consecutive steps (point
    ``i`` covers steps ``i*s + 1`` to ``min((i+1)*s, steps)``). ``artifact`` is the location of
    the final model directory; for a cancelled job, which has no final model, it is the
    location of the checkpoint written on cancel, and ``metrics`` holds only
    ``val_loss_start`` and ``train_seconds``.
    ``onnx_artifact`` is the location of the ONNX export when the request asked for one
    (``export_onnx``), else null. ``serving``: with ``serve_on``, the reply of each worker asked to
    load the model (``ModelCommandReply``; ``no_reply`` for one still loading when the job ended).
    """

    kind: TrainKind
    dataset: str
    device: str
    metrics: dict[str, float]
    loss_curve: list[float]
    steps: int
    resumed_from_step: int
    artifact: str
    cancelled: bool
    onnx_artifact: str | None = None
    serving: list[ModelCommandReply] | None = None
