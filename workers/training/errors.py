"""The error a training job raises when its request cannot run where it was sent."""

from __future__ import annotations


class TrainingConfigError(ValueError):
    """A valid request that this worker cannot train: fp16 off CUDA, a precision the device
    cannot autocast, or a checkpoint left by a different request under the same job id.

    Raised before the first optimizer step; the task maps it to ``ErrorCode.INVALID_INPUT``.
    """
