"""The load report a worker keeps per resident model (no torch import)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class LoadReport:
    """How loading one model went. Seconds and bytes."""

    model: str
    kind: str
    device: str
    dtype: str
    load_s: float
    warmup_s: float
    rss_bytes: int
    cuda_allocated_bytes: int = 0
    cuda_reserved_bytes: int = 0
    parameters: int = 0
    extra: dict = field(default_factory=dict)
