"""The job contract: the one thing producer and workers share (see docs/PROTOCOL.md)."""

from producer.contract.common import *  # noqa: F403 - re-exports common's __all__, which lists them once
from producer.contract.common import __all__ as _common_all
from producer.contract.inference import (
    ClassifyRequest,
    ClassifyResult,
    EmbedRequest,
    EmbedResult,
    GenerateRequest,
    GenerateResult,
    LabelScore,
)
from producer.contract.lifecycle import (
    MODEL_COMMAND,
    ModelCommand,
    ModelCommandReply,
    ModelOp,
    ReplyStatus,
)
from producer.contract.training import (
    Precision,
    TrainKind,
    TrainProgress,
    TrainRequest,
    TrainResult,
)

__all__ = [
    *_common_all,
    "ClassifyRequest", "ClassifyResult", "EmbedRequest", "EmbedResult", "GenerateRequest", "GenerateResult",
    "LabelScore", "Precision", "TrainKind", "TrainProgress", "TrainRequest", "TrainResult",
    "MODEL_COMMAND", "ModelCommand", "ModelCommandReply", "ModelOp", "ReplyStatus",
]
