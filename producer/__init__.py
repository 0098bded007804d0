"""Fleet's producer side: the job contract and the client. Never imports torch."""

from producer.client import FleetClient, JobHandle
from producer.contract import (
    ClassifyResult,
    EmbedResult,
    ErrorCode,
    GenerateResult,
    JobError,
    JobStatus,
)
from producer.errors import (
    FleetError,
    InvalidRequest,
    JobCancelled,
    JobFailedError,
    JobTimeout,
    UnknownModel,
    WrongModelKind,
)

__all__ = [
    "FleetClient", "JobHandle", "EmbedResult", "ClassifyResult", "GenerateResult", "ErrorCode",
    "JobError", "JobStatus", "FleetError", "InvalidRequest", "JobCancelled", "JobFailedError",
    "JobTimeout", "UnknownModel", "WrongModelKind",
]
