"""Mixed precision: which precisions a device supports, the autocast context and the scaler.

Weights, optimizer state and evaluation stay in fp32; ``bf16`` and ``fp16`` only change the
arithmetic of the training forward pass (``torch.autocast``). ``fp16`` needs a gradient
scaler against underflow and is supported on CUDA only.
"""

from __future__ import annotations

import contextlib

import torch

from producer.contract.training import Precision
from workers.training.errors import TrainingConfigError

_AUTOCAST_DTYPE = {Precision.BF16: torch.bfloat16, Precision.FP16: torch.float16}


def check_precision(precision: Precision, device: torch.device) -> None:
    """Raise ``TrainingConfigError`` unless ``device`` can train in ``precision``."""
    if precision is Precision.FP16 and device.type != "cuda":
        raise TrainingConfigError(
            f"precision fp16 needs a CUDA device, this worker trains on {device.type!r}; use bf16 or fp32"
        )
    if precision is Precision.BF16 and not torch.amp.is_autocast_available(device.type):
        raise TrainingConfigError(f"precision bf16 is not supported on {device.type!r}; use fp32")


def autocast(precision: Precision, device: torch.device) -> contextlib.AbstractContextManager[object]:
    """The context for a training forward pass in ``precision`` (a no-op for fp32)."""
    if precision is Precision.FP32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=_AUTOCAST_DTYPE[precision])


def grad_scaler(precision: Precision, device: torch.device) -> torch.amp.GradScaler:
    """A gradient scaler that is active for fp16 and a pass-through otherwise."""
    return torch.amp.GradScaler(device.type, enabled=precision is Precision.FP16)
