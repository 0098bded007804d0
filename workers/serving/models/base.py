"""Torch-side helpers shared by resident models: compute dtype and memory figures."""

from __future__ import annotations

import resource
from typing import TypedDict

import torch

from workers.serving.registry import DType, ModelSpec

TORCH_DTYPES = {DType.FP32: torch.float32, DType.FP16: torch.float16, DType.BF16: torch.bfloat16}


def compute_dtype(spec: ModelSpec, device: str) -> torch.dtype:
    """The dtype the model runs in: the registry's on CUDA, fp32 elsewhere (CPU half is slow)."""
    return TORCH_DTYPES[spec.dtype] if device.startswith("cuda") else torch.float32


class MemorySnapshot(TypedDict, total=False):
    """Bytes: peak RSS of this process; on CUDA the allocator's allocated and reserved memory."""

    rss_bytes: int
    cuda_allocated_bytes: int
    cuda_reserved_bytes: int


def memory_snapshot(device: str) -> MemorySnapshot:
    """Peak RSS of this process and, on CUDA, the allocator's allocated/reserved bytes."""
    snapshot = MemorySnapshot(rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    if device.startswith("cuda"):
        snapshot["cuda_allocated_bytes"] = torch.cuda.memory_allocated(device)
        snapshot["cuda_reserved_bytes"] = torch.cuda.memory_reserved(device)
    return snapshot
