"""Will a model fit? Its estimated size against the device memory free now, and memory figures around a load.

Used by the device process before it loads a model into a running worker (a ``load`` request,
workers/serving/device_server.py): a model that would not fit is refused with
``insufficient_memory`` instead of risking an out-of-memory error in the middle of serving.

* **Estimate**: the size of the model directory's weight files times ``SIZE_FACTOR``. The files are
  the safetensors files when there are any (what ``from_pretrained`` reads), else the ONNX graph and
  its external data (``*.onnx``, ``*.onnx.data``), else PyTorch's (``*.bin``, ``*.pt``, ``*.pth``);
  only the directory's top level is read. Hub sources have no local files to weigh: their estimate
  is 0 (not checked).
* **Free**: on CUDA, ``torch.cuda.mem_get_info``'s free bytes plus what this process's caching
  allocator holds unused (reserved minus allocated); on CPU (and MPS, whose memory is the host's),
  ``MemAvailable`` from ``/proc/meminfo``.

Bytes everywhere.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from pathlib import Path

from workers.serving.registry import ModelSpec, RegistryError, resolve_source

#: Device memory a model takes, as a multiple of its weight files' size: the weights once, plus half again
#: for what serving adds (activations at the largest batch, CUDA graphs' memory pool, KV cache of a small
#: generate model, allocator slack). A float32 file loaded as fp16/bf16 on CUDA takes half its size: the
#: estimate is then on the safe side.
SIZE_FACTOR = 1.5

_WEIGHT_PATTERNS = (("*.safetensors",), ("*.onnx", "*.onnx.data", "*.onnx_data"), ("*.bin", "*.pt", "*.pth"))


def weight_files(directory: Path) -> list[Path]:
    """The files ``from_pretrained`` (or ONNX Runtime) reads the weights from, per the module docstring."""
    for patterns in _WEIGHT_PATTERNS:
        found = sorted({path for pattern in patterns for path in directory.glob(pattern) if path.is_file()})
        if found:
            return found
    return []


def model_directory(spec: ModelSpec) -> Path | None:
    """The local directory of ``spec``'s weights, or None for a hub source."""
    scheme, _, rest = spec.source.partition(":")
    if scheme == "dir":
        return Path(rest)
    if scheme == "hub":
        return None
    try:
        return Path(resolve_source(spec)[0])
    except RegistryError:
        return None


def estimated_bytes(spec: ModelSpec) -> int:
    """Device memory ``spec`` is expected to take once loaded and warm (0 when it cannot be told)."""
    directory = model_directory(spec)
    if directory is None:
        return 0
    return int(sum(path.stat().st_size for path in weight_files(directory)) * SIZE_FACTOR)


def available_bytes(device: str) -> int:
    """Memory a new model may take on ``device`` now."""
    if device.startswith("cuda"):
        import torch

        free, _total = torch.cuda.mem_get_info(torch.device(device))
        return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    return _meminfo_bytes("MemAvailable")


def in_use_bytes(device: str) -> int:
    """Memory this process holds on ``device`` now: CUDA's allocated bytes, else its resident set."""
    if device.startswith("cuda"):
        import torch

        return int(torch.cuda.memory_allocated(device))
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def release_freed_memory(device: str) -> None:
    """Give memory freed by an unloaded model back: CUDA's cached blocks to the driver, the C heap's free
    pages to the system (glibc's ``malloc_trim``, where there is one)."""
    if device.startswith("cuda"):
        import torch

        torch.cuda.empty_cache()
        return
    libc = ctypes.util.find_library("c")
    trim = getattr(ctypes.CDLL(libc), "malloc_trim", None) if libc else None
    if trim is not None:
        trim(0)


def _meminfo_bytes(field: str) -> int:
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            name, _, value = line.partition(":")
            if name == field:
                return int(value.split()[0]) * 1024  # reported in kB
    raise OSError(f"/proc/meminfo has no {field}")
