"""Torch-side helpers shared by resident models: compute dtype and memory figures."""

from __future__ import annotations

import resource

import torch

from workers.serving.registry import DType, ModelSpec

TORCH_DTYPES = {DType.FP32: torch.float32, DType.FP16: torch.float16, DType.BF16: torch.bfloat16}


def compute_dtype(spec: ModelSpec, device: str) -> torch.dtype:
    """The dtype the model runs in: the registry's on CUDA, fp32 elsewhere (CPU half is slow)."""
    return TORCH_DTYPES[spec.dtype] if device.startswith("cuda") else torch.float32


def memory_snapshot(device: str) -> dict[str, int]:
    """Peak RSS of this process and, on CUDA, the allocator's allocated/reserved bytes."""
    snapshot = {"rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    if device.startswith("cuda"):
        snapshot["cuda_allocated_bytes"] = torch.cuda.memory_allocated(device)
        snapshot["cuda_reserved_bytes"] = torch.cuda.memory_reserved(device)
    return snapshot
