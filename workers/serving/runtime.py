"""The per-process runtime: the device, the resident models and their batchers.

Built once by ``fleet worker`` after the process starts and before it consumes; tasks
reach it through ``current()``. Nothing is loaded at import time.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field

from producer.contract import ErrorCode, ModelKind
from producer.errors import JobFailedError
from workers.serving.batching import DynamicBatcher
from workers.serving.models.report import LoadReport
from workers.serving.registry import ModelSpec
from workers.settings import WorkerSettings

log = logging.getLogger(__name__)


@dataclass
class ResidentModel:
    """A loaded model, its registry entry, and the batcher that owns its device calls."""

    spec: ModelSpec
    impl: object
    #: None for models that run one request at a time (generation).
    batcher: DynamicBatcher | None
    report: LoadReport


@dataclass
class WorkerRuntime:
    """State of one worker process: the jobs executing now (``in_flight_ids``) and counters."""

    settings: WorkerSettings
    device: str
    models: dict[str, ResidentModel]
    started_at: float = field(default_factory=time.time)
    in_flight_ids: set[str] = field(default_factory=set)
    jobs_done: int = 0
    last_job_at: float | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @classmethod
    def load(cls, settings: WorkerSettings, device: str, specs: list[ModelSpec]) -> WorkerRuntime:
        """Load and warm up every model in ``specs`` on ``device``; any failure propagates."""
        from workers.serving.models.loader import load_model

        models: dict[str, ResidentModel] = {}
        for spec in specs:
            impl, report = load_model(spec, device)
            batcher = None
            if hasattr(impl, "run_batch"):
                batcher = DynamicBatcher(spec.name, impl.run_batch, max_batch_size=spec.max_batch_size,
                                         max_wait_s=spec.max_wait_ms / 1000.0,
                                         on_out_of_memory=_release_cuda_cache if device.startswith("cuda") else None)
            models[spec.name] = ResidentModel(spec, impl, batcher, report)
        return cls(settings=settings, device=device, models=models)

    def model(self, name: str, kind: ModelKind) -> ResidentModel:
        """Return the resident model ``name`` or fail the job with ``unknown_model`` / ``wrong_model_kind``."""
        resident = self.models.get(name)
        if resident is None:
            raise JobFailedError(ErrorCode.UNKNOWN_MODEL.value, f"this worker does not serve model {name!r}",
                                 {"served": sorted(self.models)})
        if resident.spec.kind is not kind:
            raise JobFailedError(ErrorCode.WRONG_MODEL_KIND.value,
                                 f"model {name!r} serves {resident.spec.kind.value!r} jobs, not {kind.value!r}")
        return resident

    @property
    def in_flight(self) -> int:
        return len(self.in_flight_ids)

    def job_started(self, job_id: str) -> None:
        with self._lock:
            self.in_flight_ids.add(job_id)

    def job_finished(self, job_id: str) -> None:
        with self._lock:
            self.in_flight_ids.discard(job_id)
            self.jobs_done += 1
            self.last_job_at = time.time()

    def close(self) -> None:
        for resident in self.models.values():
            if resident.batcher is not None:
                resident.batcher.close()


def _release_cuda_cache() -> None:
    import torch

    torch.cuda.empty_cache()


_current: WorkerRuntime | None = None


def install(runtime: WorkerRuntime) -> None:
    """Make ``runtime`` the one that tasks in this process use."""
    global _current
    _current = runtime


def current() -> WorkerRuntime:
    """The installed runtime; a task running without one is a deployment error."""
    if _current is None:
        raise JobFailedError(ErrorCode.INTERNAL.value,
                             "worker runtime not initialised (start workers with `fleet worker`)")
    return _current
