"""The job contract: the one thing producer and workers share (see docs/PROTOCOL.md)."""

from producer.contract.common import *  # noqa: F401,F403
from producer.contract.common import __all__ as _common_all  # noqa: F401
from producer.contract.inference import (  # noqa: F401
    ClassifyRequest,
    ClassifyResult,
    EmbedRequest,
    EmbedResult,
    GenerateRequest,
    GenerateResult,
    LabelScore,
)
from producer.contract.training import (  # noqa: F401
    Precision,
    TrainKind,
    TrainProgress,
    TrainRequest,
    TrainResult,
)
