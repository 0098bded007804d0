"""Fleet's producer side: the job contract and the client. Never imports torch."""

from producer.async_client import AsyncFleetClient, AsyncJobHandle
from producer.client import FleetClient, JobHandle
from producer.contract import (
    ClassifyResult,
    EmbedResult,
    ErrorCode,
    GenerateResult,
    JobError,
    JobStatus,
    TrainProgress,
    TrainResult,
)
from producer.errors import (
    FleetError,
    InvalidRequest,
    JobCancelled,
    JobExpired,
    JobFailedError,
    JobTimeout,
    QueueFull,
    UnknownModel,
    WrongModelKind,
)

__all__ = [
    "FleetClient", "JobHandle", "EmbedResult", "ClassifyResult", "GenerateResult", "ErrorCode",
    "JobError", "JobStatus", "FleetError", "InvalidRequest", "JobCancelled", "JobExpired", "QueueFull",
    "JobFailedError",
    "JobTimeout", "UnknownModel", "WrongModelKind", "AsyncFleetClient", "AsyncJobHandle",
    "TrainProgress", "TrainResult",
]
