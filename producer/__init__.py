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
    ModelCommandReply,
    TrainProgress,
    TrainResult,
)
from producer.errors import (
    FleetConnectionError,
    FleetError,
    FleetRedisError,
    IdempotencyConflictError,
    InvalidRequest,
    InvalidRequestError,
    JobCancelled,
    JobCancelledError,
    JobExpired,
    JobExpiredError,
    JobFailedError,
    JobIdConflictError,
    JobTimeout,
    JobTimeoutError,
    ModelUnavailableError,
    NoMatchingWorkerError,
    QueueFull,
    QueueFullError,
    RedisCommandError,
    RedisURLError,
    UnknownModel,
    UnknownModelError,
    WrongModelKind,
    WrongModelKindError,
)

__all__ = [
    "FleetClient", "JobHandle", "AsyncFleetClient", "AsyncJobHandle",
    "EmbedResult", "ClassifyResult", "GenerateResult", "TrainProgress", "TrainResult", "ErrorCode", "JobError",
    "ModelCommandReply",
    "JobStatus",
    "FleetError", "FleetRedisError", "RedisCommandError", "InvalidRequestError", "UnknownModelError",
    "WrongModelKindError", "IdempotencyConflictError",
    "JobIdConflictError", "ModelUnavailableError", "NoMatchingWorkerError", "QueueFullError", "JobFailedError",
    "JobCancelledError",
    "JobExpiredError", "JobTimeoutError", "FleetConnectionError", "RedisURLError",
    # aliases of the first release's names (producer/errors.py)
    "InvalidRequest", "UnknownModel", "WrongModelKind", "JobCancelled", "JobExpired", "JobTimeout", "QueueFull",
]
