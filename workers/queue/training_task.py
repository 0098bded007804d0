"""The ``fleet.train`` task: run a training job on the group's device, report progress,
stop on cancel, resume after a crash (from its checkpoint), register the finished model and, with
``serve_on``, have the running ``--serve-trained`` workers load it (workers/queue/model_commands.py).

The training loop itself runs in the device process (workers/serving/device_server.py);
this task, in a consumer, relays its progress to the result backend (``PROGRESS``, about
once a second) and its cancel flag to the device.
"""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path
from typing import Any

from celery.exceptions import Ignore, Reject

from producer import keys
from producer.contract import TASK_TRAIN, ErrorCode, TrainProgress, TrainRequest
from producer.contract.training import TrainKind
from producer.errors import JobFailedError
from workers.observability import telemetry
from workers.queue.app import app
from workers.queue.job_context import JobContext
from workers.queue.model_commands import serve_trained_model
from workers.queue.tasks import FleetRequest, begin, parse_payload, refuse_bad_headers
from workers.serving import inference
from workers.serving import runtime as runtime_module
from workers.serving.device_client import DeviceLost
from workers.serving.registry import load_registry
from workers.training.artifacts import LocalDirectoryStore

log = logging.getLogger(__name__)

#: One training job at a time per worker: it owns the device's spare capacity.
_training_slot = threading.Semaphore(1)

_KIND_SERVES = {TrainKind.MLP: "classify", TrainKind.CNN: "classify", TrainKind.CAUSAL_LM: "generate"}


def registry_entry(kind: TrainKind, model_directory: str | Path, onnx: bool = False) -> dict:
    """The ``fleet:trained-models`` entry that serves the model in ``model_directory`` (with ``onnx``: an
    ONNX export of it, served with ONNX Runtime)."""
    return {"kind": _KIND_SERVES[kind], "source": f"dir:{Path(model_directory).resolve()}", "max_batch_size": 64,
            "max_wait_ms": 2, "max_seq_len": 512, **({"backend": "onnxruntime"} if onnx else {})}


def own_registry_entry(store, job_id: str, kind: TrainKind) -> dict | None:
    """The entry this job registers, if its final model already exists (a redelivery after it finished)."""
    try:
        return registry_entry(kind, store.model_directory(job_id))
    except FileNotFoundError:
        return None


def refuse_taken_name(context: JobContext, registry_path: Path, name: str, own_entry: dict | None) -> None:
    """Fail the job with ``model_name_taken`` if ``name`` is already a model: in this worker's registry file,
    in ``fleet:trained-models`` (unless this very job registered it: ``own_entry``) or in the catalog of
    served models. Checked before training, so that no compute is spent on a model that could not be served.
    """
    trained = context.redis.hget(keys.TRAINED_MODELS, name)
    if trained is not None:
        holder = None if own_entry is not None and json.loads(trained) == own_entry else "a finished training job"
    elif name in load_registry(registry_path):
        holder = "the worker's model registry file"
    elif context.redis.hexists(keys.CATALOG, name):
        holder = "a serving worker's registry (the model catalog)"
    else:
        holder = None
    if holder is not None:
        raise JobFailedError(ErrorCode.MODEL_NAME_TAKEN.value,
                             f"register_as {name!r} is taken: {holder} already registered a model of that name; "
                             "choose another name", {"register_as": name, "held_by": holder})


def register_trained_model(context: JobContext, name: str, kind: TrainKind, artifact: str,
                           onnx_artifact: str | None = None) -> dict:
    """Publish a registry entry for the finished model (its ONNX export, if it has one), unless another job
    took ``name`` meanwhile (``model_name_taken``; the model stays in the artifact store). Workers started
    with ``--models name`` load it."""
    entry = registry_entry(kind, onnx_artifact or artifact, onnx=onnx_artifact is not None)
    if not context.redis.hsetnx(keys.TRAINED_MODELS, name, json.dumps(entry)):
        if json.loads(context.redis.hget(keys.TRAINED_MODELS, name)) != entry:
            raise JobFailedError(ErrorCode.MODEL_NAME_TAKEN.value,
                                 f"register_as {name!r} was registered by another job while this one trained; "
                                 "its model is kept in the artifact store under this job's id",
                                 {"register_as": name, "held_by": "a finished training job"})
    log.info("registered trained model %s (%s) from %s", name, entry["kind"], artifact)
    return entry


@app.task(name=TASK_TRAIN, bind=True, throws=(JobFailedError,), Request=FleetRequest)
def train_task(self, *args, **kwargs) -> dict:
    """Train (payload: ``TrainRequest``; result: ``TrainResult``). Re-delivered, it resumes from its checkpoint."""
    runtime = runtime_module.current()
    context, _ = begin(self)
    refuse_bad_headers(self)
    request = parse_payload(TrainRequest, args, kwargs)
    if request.register_as:
        store = LocalDirectoryStore(runtime.settings.artifact_dir)
        refuse_taken_name(context, runtime.settings.model_registry, request.register_as,
                          own_registry_entry(store, context.job_id, request.kind))

    model_label = request.register_as or request.kind.value  # the metrics' ml.model.name

    def report(progress: dict[str, Any]) -> None:
        self.update_state(state="PROGRESS", meta=progress)
        telemetry.record_training_progress(model_label, request.kind.value, TrainProgress.model_validate(progress))

    with _training_slot:
        runtime.job_started(context.job_id)
        try:
            result = inference.train(runtime, request, context, report)
        except DeviceLost:
            log.warning("training job %s: the device process ended; handing it back (it resumes from its "
                        "checkpoint)", context.job_id)
            raise Reject("device process lost", requeue=True) from None
        except inference.ModelFailed as exc:
            raise JobFailedError(exc.code, str(exc)) from None
        except (JobFailedError, Ignore):
            raise
        finally:
            runtime.job_finished(context.job_id)
    accuracy = (result.get("metrics") or {}).get("accuracy")
    if accuracy is not None:
        telemetry.record_model_accuracy(model_label, request.kind.value, accuracy)
    if result.get("cancelled"):
        log.info("training job %s cancelled at step %s; checkpoint kept", context.job_id, result.get("steps"))
        context.stop_as_cancelled()
    if request.register_as:
        register_trained_model(context, request.register_as, request.kind, result["artifact"],
                               result.get("onnx_artifact"))
    if request.serve_on and request.register_as:  # serve_on comes with register_as (TrainRequest checks)
        replies = serve_trained_model(app, context.redis, request.register_as, request.serve_on)
        result["serving"] = [reply.model_dump(mode="json") for reply in replies]
    return result

