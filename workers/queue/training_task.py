"""The ``fleet.train`` task: run a training job on this worker's device, report progress,
checkpoint, resume after a crash, stop on cancel, and register the finished model.
"""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path

from producer import keys
from producer.contract import TASK_TRAIN, ErrorCode, TrainRequest
from producer.contract.training import TrainKind
from producer.errors import JobFailedError
from workers.queue.app import app
from workers.queue.tasks import FleetRequest, JobContext, parse_payload, refuse_bad_headers
from workers.serving import runtime as runtime_module

log = logging.getLogger(__name__)

#: One training job at a time per worker process: it owns the device's spare capacity.
_training_slot = threading.Semaphore(1)
#: Progress reaches the result backend at most this often (seconds).
PROGRESS_INTERVAL_S = 1.0

_KIND_SERVES = {TrainKind.MLP: "classify", TrainKind.CNN: "classify", TrainKind.CAUSAL_LM: "generate"}


def register_trained_model(context: JobContext, name: str, kind: TrainKind, artifact: str) -> dict:
    """Publish a registry entry for the finished model; workers started with ``--models name`` load it."""
    entry = {"kind": _KIND_SERVES[kind], "source": f"dir:{Path(artifact).resolve()}", "max_batch_size": 64,
             "max_wait_ms": 2, "max_seq_len": 512}
    context.redis.hset(keys.TRAINED_MODELS, name, json.dumps(entry))
    log.info("registered trained model %s (%s) from %s", name, entry["kind"], artifact)
    return entry


@app.task(name=TASK_TRAIN, bind=True, throws=(JobFailedError,), Request=FleetRequest)
def train_task(self, *args, **kwargs) -> dict:
    """Train (payload: ``TrainRequest``; result: ``TrainResult``). Re-delivered, it resumes from its checkpoint."""
    from workers.training.artifacts import LocalDirectoryStore
    from workers.training.errors import TrainingConfigError
    from workers.training.loop import run_training

    runtime = runtime_module.current()
    context = JobContext(self)
    context.begin_attempt()
    refuse_bad_headers(self)
    request = parse_payload(TrainRequest, args, kwargs)
    if context.cancelled():
        context.stop_as_cancelled()
    store = LocalDirectoryStore(runtime.settings.artifact_dir)

    def report(progress) -> None:
        self.update_state(state="PROGRESS", meta=progress.model_dump(mode="json"))

    with _training_slot:
        runtime.job_started(context.job_id)
        try:
            result = run_training(request, runtime.device, store, job_id=context.job_id, on_progress=report,
                                  should_stop=context.cancelled, progress_interval_s=PROGRESS_INTERVAL_S)
        except TrainingConfigError as exc:
            raise JobFailedError(ErrorCode.INVALID_INPUT.value, str(exc)) from None
        except Exception as exc:  # a training failure fails this job, never the worker
            log.exception("training job %s failed", context.job_id)
            code = ErrorCode.OUT_OF_MEMORY if "out of memory" in str(exc).lower() else ErrorCode.MODEL_ERROR
            raise JobFailedError(code.value, f"{type(exc).__name__}: {exc}") from None
        finally:
            runtime.job_finished(context.job_id)
    if result.cancelled:
        log.info("training job %s cancelled at step %d; checkpoint kept in %s", context.job_id, result.steps,
                 runtime.settings.artifact_dir)
        context.stop_as_cancelled()
    if request.register_as:
        register_trained_model(context, request.register_as, request.kind, result.artifact)
    return result.model_dump(mode="json")
