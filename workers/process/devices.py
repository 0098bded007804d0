"""Choosing and pinning the one device a worker process uses.

``pin_cuda_device`` must run before torch initialises CUDA: it narrows
``CUDA_VISIBLE_DEVICES`` to one GPU so the process sees exactly that device as ``cuda:0``.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import MutableMapping
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

_CUDA_RE = re.compile(r"^cuda:(\d+)$")
DEVICE_CHOICES = "auto | cpu | mps | cuda:N"


class DeviceError(ValueError):
    """The requested device does not exist or is not usable on this machine."""


@dataclass(frozen=True)
class DeviceChoice:
    """The torch device string a worker uses and a human sentence saying why."""

    device: str
    reason: str


def parse_device(requested: str) -> str:
    """Check the syntax of ``requested``; return it normalised. Raises ``DeviceError``."""
    value = requested.strip().lower()
    if value in ("auto", "cpu", "mps") or _CUDA_RE.match(value):
        return value
    raise DeviceError(f"unknown device {requested!r}; expected {DEVICE_CHOICES}")


def pin_cuda_device(requested: str, environ: MutableMapping[str, str] | None = None) -> str:
    """For ``cuda:N``, narrow ``CUDA_VISIBLE_DEVICES`` to the N-th visible GPU; return ``cuda:0``.

    Other devices are returned unchanged. ``environ`` defaults to ``os.environ`` and is
    modified in place. Call before importing torch.
    """
    environ = os.environ if environ is None else environ
    match = _CUDA_RE.match(requested)
    if not match:
        return requested
    index = int(match.group(1))
    visible = environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() != "":
        ids = [part.strip() for part in visible.split(",") if part.strip()]
        if index >= len(ids):
            raise DeviceError(f"cuda:{index} requested but CUDA_VISIBLE_DEVICES={visible!r} lists {len(ids)}")
        environ["CUDA_VISIBLE_DEVICES"] = ids[index]
    else:
        environ["CUDA_VISIBLE_DEVICES"] = str(index)
    return "cuda:0"


def choose_device(requested: str) -> DeviceChoice:
    """Resolve ``requested`` (already pinned) to an available torch device.

    ``auto`` prefers CUDA, then Apple MPS, then CPU. An explicit device that is not
    available raises ``DeviceError`` rather than silently falling back.
    """
    import torch

    cuda = torch.cuda.is_available()
    mps = bool(getattr(torch.backends, "mps", None)) and torch.backends.mps.is_available()
    if requested == "auto":
        if cuda:
            return DeviceChoice("cuda:0", f"auto: CUDA is available ({torch.cuda.get_device_name(0)})")
        if mps:
            return DeviceChoice("mps", "auto: no CUDA; Apple MPS is available")
        return DeviceChoice("cpu", "auto: neither CUDA nor MPS is available")
    if requested.startswith("cuda"):
        if not cuda:
            raise DeviceError(f"{requested} requested but torch sees no CUDA device")
        return DeviceChoice(requested, f"requested {requested} ({torch.cuda.get_device_name(0)}, "
                                       f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')})")
    if requested == "mps" and not mps:
        raise DeviceError("mps requested but torch reports MPS unavailable")
    return DeviceChoice(requested, f"requested {requested}")


def device_identity(device: str) -> dict[str, Any]:
    """Describe the physical device (name; for CUDA its UUID and how many GPUs this process sees)."""
    import torch

    if device.startswith("cuda"):
        props = torch.cuda.get_device_properties(torch.device(device))
        return {"device": device, "name": props.name, "uuid": str(getattr(props, "uuid", "")),
                "visible_gpus": torch.cuda.device_count()}
    return {"device": device, "name": device, "uuid": "", "visible_gpus": 0}
