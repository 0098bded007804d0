"""The device process: the one process of a worker group that imports torch and touches the device.

Started by the group's launcher with multiprocessing's ``spawn`` (never forked from a
process that touched CUDA), it loads the group's models, warms them up (CUDA graphs
included), reports them to the launcher, then serves the consumer processes over ZeroMQ
(workers/serving/ipc.py) until it is told to stop:

* ``infer`` requests of every consumer go to the model's one ``DynamicBatcher``, so a device
  batch gathers jobs from all consumers; each job's rows go back as one float32 frame;
* ``generate`` requests join their model's continuous-batching engine
  (workers/serving/generation/), which streams each job's pieces back from its decode thread;
  ``train`` requests run on a thread of their own and stream their progress back;
* while a batch computes, the status board holds the ids of its jobs, so that if the process
  dies the launcher knows which jobs were in compute (docs/RELIABILITY.md, "Attempts");
* ``load`` and ``unload`` requests (the launcher's, workers/process/model_lifecycle.py) add or
  remove a model while the others keep serving: a load is checked against the free device memory
  (workers/serving/memory_budget.py), then loaded and warmed up (CUDA graphs included) on a thread
  of its own; an unloaded model's queued work is handed back and its memory freed. A request for a
  model being unloaded is answered ``unavailable`` (its job goes back to the queue).

Threads: the main thread owns the ROUTER socket (receives requests, sends every reply);
batcher threads and job threads hand replies to it through one inproc PUSH socket each.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import zmq

from producer.contract import ErrorCode, ModelKind
from workers.observability.telemetry import span_from_traceparent
from workers.process.status_board import COMPUTING_SLOTS, State, StatusBoard
from workers.serving import ipc
from workers.serving.batching import BatcherClosed, DynamicBatcher, is_out_of_memory
from workers.serving.registry import ModelSpec, RegistryError, resolve_source
from workers.settings import WorkerSettings

log = logging.getLogger("fleet.device")

#: Address of the inproc socket on which threads hand replies to the main thread.
_REPLIES = "inproc://fleet-device-replies"
#: The main loop wakes at least this often (s) to tick the status board and look for a stop.
_TICK_S = 0.5
#: Status-board slot of the training job in compute (models take the slots from 0).
TRAINING_SLOT = COMPUTING_SLOTS - 1
#: Most requests taken off the ROUTER socket per loop turn before replies are forwarded.
_BURST = 256


@dataclass(frozen=True)
class DeviceConfig:
    """Everything the device process needs, passed through ``spawn`` (picklable)."""

    worker_name: str
    device: str
    specs: list[dict[str, Any]]
    address: str
    board_path: str
    settings: dict[str, Any] = field(default_factory=dict)


@dataclass
class _Work:
    """One input of one job inside a device batch: the model's input and the job it belongs to;
    ``batch`` is set to the batch span's ``traceparent`` when the batch runs (telemetry on)."""

    data: Any
    job: str
    batch: str | None = None


class _InFlight:
    """Jobs a status-board slot is computing outside a batcher (training), kept on the board."""

    def __init__(self, board: StatusBoard, slot: int):
        self._board, self._slot = board, slot
        self._jobs: set[str] = set()
        self._lock = threading.Lock()

    @contextmanager
    def computing(self, job: str) -> Iterator[None]:
        with self._lock:
            self._jobs.add(job)
            self._board.batch_started(self._slot, sorted(self._jobs))
        try:
            yield
        finally:
            with self._lock:
                self._jobs.discard(job)
                if self._jobs:
                    self._board.batch_started(self._slot, sorted(self._jobs))
                else:
                    self._board.batch_finished(self._slot)


class _EngineHooks:
    """A generation engine's hooks in the device process: the running jobs on the status board
    (crash attribution), and the GenAI metrics of each finished job."""

    def __init__(self, board: StatusBoard, slot: int):
        self._board, self._slot = board, slot

    def on_step(self, model: str, step: Any) -> None:
        if step.job_ids:
            self._board.batch_started(self._slot, list(step.job_ids))
        else:
            self._board.batch_finished(self._slot)

    def on_first_token(self, model: str, job_id: str, ttft_s: float) -> None:
        return None

    def on_finish(self, model: str, outcome: Any) -> None:
        from workers.observability import telemetry

        if outcome.ttft_s is not None:
            telemetry.record_generation(model, time_to_first_token_s=outcome.ttft_s,
                                        output_tokens=outcome.tokens_generated,
                                        duration_s=outcome.ttft_s + (outcome.decode_s or 0.0),
                                        error_type=None if outcome.finish.completed else outcome.finish.value)


class _Resident:
    """A loaded model, its batcher (None for generators) and its status-board slot."""

    def __init__(self, spec: ModelSpec, impl: Any, report: Any, slot: int, board: StatusBoard, device: str):
        self.spec, self.impl, self.report, self.slot = spec, impl, report, slot
        self.batcher: DynamicBatcher | None = None
        #: Infer jobs handed to the batcher and not answered yet.
        self.outstanding = 0
        self._outstanding_lock = threading.Lock()
        if hasattr(impl, "run_batch"):
            from workers.observability.telemetry import BatchScope

            self.batcher = DynamicBatcher(spec.name, self._run_batch, max_batch_size=spec.max_batch_size,
                                          max_wait_s=spec.max_wait_ms / 1000.0,
                                          on_out_of_memory=_release_cuda_cache if device.startswith("cuda") else None,
                                          batch_hook=BatchScope(device, {spec.name: spec.kind.value}))
        self._board = board
        if spec.kind is ModelKind.GENERATE:
            impl.attach_hooks(_EngineHooks(board, slot))

    def _run_batch(self, works: list[_Work], info: Any) -> list[Any]:
        from workers.observability.telemetry import current_traceparent

        self._board.batch_started(self.slot, sorted({work.job for work in works}))
        batch = current_traceparent()  # the batch span's (BatchScope opened it around this call)
        for work in works:
            work.batch = batch
        try:
            return self.impl.run_batch([work.data for work in works], info)
        finally:
            self._board.batch_finished(self.slot)

    def card(self) -> dict[str, Any]:
        """What a consumer needs to know of this model to validate, tokenise and answer its jobs."""
        impl, spec = self.impl, self.spec
        return {"name": spec.name, "kind": spec.kind.value, "queue": spec.queue,
                "input_kind": getattr(impl, "input_kind", "texts" if spec.kind is ModelKind.EMBED else "prompt"),
                "labels": list(getattr(impl, "labels", []) or []), "dim": getattr(impl, "dim", None),
                "features": getattr(impl, "features", None),
                "max_seq_len": int(getattr(impl, "max_seq_len", spec.max_seq_len)), "tokenizer": _tokenizer_file(spec),
                "slots": impl.limits.max_sequences if spec.kind is ModelKind.GENERATE else None,
                "device": str(impl.device), "dtype": str(impl.dtype).removeprefix("torch."),
                "load": {"load_s": self.report.load_s, "warmup_s": self.report.warmup_s,
                         "rss_bytes": self.report.rss_bytes, "parameters": self.report.parameters,
                         "cuda_allocated_bytes": self.report.cuda_allocated_bytes,
                         "cuda_reserved_bytes": self.report.cuda_reserved_bytes}}

    def job_added(self, count: int) -> None:
        with self._outstanding_lock:
            self.outstanding += count

    def busy(self) -> int:
        """Jobs of this model in the device now: infer jobs not answered, or sequences in the engine."""
        if self.spec.kind is ModelKind.GENERATE:
            return self.impl.limits.max_sequences - self.impl.free_slots()
        with self._outstanding_lock:
            return self.outstanding

    def close(self, hand_back_queued: bool = False) -> None:
        """Stop serving. ``hand_back_queued`` (an unload, its drain grace spent): work still queued in the
        batcher fails at once as closing, so that its jobs go back to their queue; else it may run first."""
        if self.batcher is not None:
            if hand_back_queued:
                self.batcher.close(timeout=0)
            self.batcher.close()
        elif self.spec.kind is ModelKind.GENERATE:
            self.impl.close()  # its generation engine: running sequences are handed back


def _tokenizer_file(spec: ModelSpec) -> str | None:
    """The model directory's ``tokenizer.json`` (consumers tokenise with it), or None."""
    try:
        location, revision = resolve_source(spec)
    except RegistryError:  # e.g. a Fleet-trained feature classifier: no transformers config, no tokenizer
        return None
    path = os.path.join(location, "tokenizer.json")
    return path if revision is None and os.path.isfile(path) else None


#: Niceness of the thread that loads models into a serving device process (and of the threads it starts).
LOAD_NICENESS = 10


def _lower_thread_priority() -> None:
    """Make the calling thread yield the CPU to the serving threads (Linux: a thread has its own nice value,
    inherited by the threads it creates, e.g. the OpenMP team of its torch calls)."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), LOAD_NICENESS)
    except (AttributeError, OSError) as exc:  # not Linux, or not allowed: load at the same priority
        log.info("model loads run at normal priority: %s", exc)


def _release_cuda_cache() -> None:
    import torch

    torch.cuda.empty_cache()


class _Replies:
    """Thread-local PUSH sockets: any thread hands a reply (identity first) to the main thread."""

    def __init__(self, context: zmq.Context):
        self._context = context
        self._local = threading.local()

    def send(self, frames: list[bytes]) -> None:
        sock = getattr(self._local, "socket", None)
        if sock is None:
            sock = self._context.socket(zmq.PUSH)
            sock.setsockopt(zmq.LINGER, 1000)
            sock.connect(_REPLIES)
            self._local.socket = sock
        sock.send_multipart(frames, copy=False)


class DeviceServer:
    """Serves the consumers of one group from the models in ``residents``."""

    def __init__(self, residents: dict[str, _Resident], address: str, board: StatusBoard,
                 settings: WorkerSettings, device: str):
        self.residents = residents
        self.board = board
        self.settings = settings
        self.device = device
        self._context: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
        self._router = self._context.socket(zmq.ROUTER)
        self._router.setsockopt(zmq.LINGER, 0)
        self._router.bind(address)
        self._pull = self._context.socket(zmq.PULL)
        self._pull.bind(_REPLIES)
        self._replies = _Replies(self._context)
        self._training_threads = ThreadPoolExecutor(max_workers=2, thread_name_prefix="device-train")
        #: Loads and unloads, one at a time, beside the serving threads (niced: serving goes first on the CPU).
        self._lifecycle_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="device-lifecycle",
                                                    initializer=_lower_thread_priority)
        #: Models unloaded (or being unloaded): a request for one is answered ``unavailable``.
        self._retired: set[str] = set()
        self._cancelled: dict[str, float] = {}
        self._cancel_lock = threading.Lock()
        self._stopping = threading.Event()
        self._training = _InFlight(board, TRAINING_SLOT)

    # --- the loop -----------------------------------------------------------------------------

    def stop(self) -> None:
        self._stopping.set()

    def serve(self) -> None:
        """Serve until ``stop()``; then stop the batchers (queued items fail as closing)."""
        poller = zmq.Poller()
        poller.register(self._router, zmq.POLLIN)
        poller.register(self._pull, zmq.POLLIN)
        try:
            while not self._stopping.is_set():
                ready = dict(poller.poll(int(_TICK_S * 1000)))
                self.board.device_tick()
                if self._pull in ready:
                    self._forward_replies()
                if self._router in ready:
                    for _ in range(_BURST):
                        try:
                            frames = self._router.recv_multipart(zmq.NOBLOCK)
                        except zmq.Again:
                            break
                        self._handle(frames[0], frames[1:])
                    self._forward_replies()
        finally:
            self._lifecycle_thread.shutdown(wait=True, cancel_futures=True)
            for resident in self.residents.values():
                resident.close()
            self._forward_replies()
            self._training_threads.shutdown(wait=False, cancel_futures=True)

    def _forward_replies(self) -> None:
        while True:
            try:
                self._router.send_multipart(self._pull.recv_multipart(zmq.NOBLOCK), copy=False)
            except zmq.Again:
                return

    def _reply(self, identity: bytes, frames: list[bytes]) -> None:
        """Send from the main thread (it owns the ROUTER socket)."""
        self._router.send_multipart([identity, *frames], copy=False)

    def stats(self) -> dict[str, Any]:
        """Batcher statistics per model (with the CUDA-graph report where there is one) and memory."""
        from workers.serving.models.base import memory_snapshot

        batching = {}
        for name, resident in list(self.residents.items()):
            if resident.batcher is None:
                continue
            entry = resident.batcher.stats_snapshot()
            report = getattr(resident.impl, "graph_report", None)
            if report is not None:
                entry["graphs"] = {key: value for key, value in vars(report).items() if key != "shapes"}
            batching[name] = entry
        return {"batching": batching, "memory": memory_snapshot(self.device)}

    # --- requests -------------------------------------------------------------------------

    def _handle(self, identity: bytes, frames: list[bytes]) -> None:
        try:
            header, payloads = ipc.unpack(frames)
        except ValueError as exc:
            log.error("dropped an undecodable request: %s", exc)
            return
        op, rid = header.get("op"), header.get("rid")
        try:
            if op == "infer":
                self._infer(identity, header, payloads)
            elif op == "generate":
                self._generate(identity, header)
            elif op == "train":
                self._training_threads.submit(self._train, identity, header)
            elif op == "cancel":
                self._cancel(str(header.get("job")), header.get("model"))
            elif op == "stats":
                self._reply(identity, ipc.pack({"rid": rid, "ok": True, **self.stats()}))
            elif op == "load":
                self._lifecycle_thread.submit(self._load, identity, header)
            elif op == "unload":
                self._lifecycle_thread.submit(self._unload, identity, header)
            elif op == "busy":
                resident = self.residents.get(str(header.get("model")))
                self._reply(identity, ipc.pack({"rid": rid, "ok": True, "jobs": resident.busy() if resident else 0}))
            elif op == "ping":
                self._reply(identity, ipc.pack({"rid": rid, "ok": True, "models": sorted(self.residents)}))
            else:
                self._reply(identity, ipc.error_reply(rid, ErrorCode.INTERNAL.value, f"unknown op {op!r}"))
        except _RequestError as exc:
            self._reply(identity, ipc.error_reply(rid, exc.code, str(exc), exc.details))
        except Exception as exc:
            log.exception("request %r failed", op)
            self._reply(identity, ipc.error_reply(rid, ErrorCode.INTERNAL.value, f"{type(exc).__name__}: {exc}"))

    def _resident(self, name: Any, kind: ModelKind | None = None) -> _Resident:
        resident = self.residents.get(name)
        if resident is None and name in self._retired:
            raise _RequestError("unavailable", f"model {name!r} is being unloaded from this worker")
        if resident is None:
            raise _RequestError(ErrorCode.UNKNOWN_MODEL.value, f"this worker does not serve model {name!r}",
                                {"served": sorted(self.residents)})
        if kind is not None and resident.spec.kind is not kind:
            raise _RequestError(ErrorCode.WRONG_MODEL_KIND.value,
                                f"model {name!r} serves {resident.spec.kind.value!r} jobs, not {kind.value!r}")
        return resident

    def _infer(self, identity: bytes, header: dict[str, Any], payloads: list[bytes]) -> None:
        resident = self._resident(header.get("model"))
        if resident.batcher is None:
            raise _RequestError(ErrorCode.WRONG_MODEL_KIND.value, f"model {resident.spec.name!r} takes no infer jobs")
        job = str(header.get("job", ""))
        if "shape" in header:  # feature vectors
            items: list[Any] = [row.tolist() for row in ipc.decode_matrix(header["shape"], payloads[0])]
            costs = None
        else:
            id_arrays = ipc.decode_tokens(payloads[0], payloads[1])
            items = [ids.tolist() for ids in id_arrays]
            costs = [len(ids) for ids in items]
        if not items:
            raise _RequestError(ErrorCode.INVALID_INPUT.value, "no inputs")
        works = [_Work(item, job) for item in items]
        try:
            futures = resident.batcher.submit(works, costs=costs, context=span_from_traceparent(header.get("trace")),
                                              isolated=bool(header.get("isolate")))
        except BatcherClosed:  # unloaded between the lookup and now
            raise _RequestError("unavailable", f"model {resident.spec.name!r} is being unloaded") from None
        resident.job_added(1)
        _JobReply(self._replies, identity, header.get("rid"), futures, works, bool(header.get("normalize")),
                  resident.spec.kind is ModelKind.EMBED, on_reply=lambda: resident.job_added(-1))

    def _cancel(self, job: str, model: Any) -> None:
        resident = self.residents.get(model)
        if resident is not None and resident.spec.kind is ModelKind.GENERATE:
            resident.impl.cancel(job)
            return
        now = time.monotonic()
        with self._cancel_lock:
            self._cancelled[job] = now
            for stale in [j for j, at in self._cancelled.items() if now - at > 3600]:
                del self._cancelled[stale]

    def _is_cancelled(self, job: str) -> bool:
        with self._cancel_lock:
            return job in self._cancelled

    def _generate(self, identity: bytes, header: dict[str, Any]) -> None:
        """Hand a generate job to its model's engine (it returns at once); pieces and the outcome
        are sent from the engine's decode thread as they come."""
        from producer.contract import GenerateRequest
        from workers.serving.generation.engine import EngineClosed
        from workers.serving.generation.limits import PromptTooLong
        from workers.serving.generation.sampling import Sampling

        rid, job = header.get("rid"), str(header.get("job", ""))
        request = GenerateRequest.model_validate(header["request"])
        engine = self._resident(request.model, ModelKind.GENERATE).impl

        def on_piece(text: str) -> None:
            self._replies.send([identity, *ipc.pack({"rid": rid, "event": "piece", "text": text})])

        def on_done(outcome: Any) -> None:
            self._replies.send([identity, *_generation_reply(rid, request, engine, outcome)])

        try:
            engine.submit(job, request.prompt, Sampling.of(request), on_piece=on_piece if request.stream else None,
                          on_done=on_done, deadline=header.get("deadline"), priority=int(header.get("priority") or 0),
                          truncate=request.truncate)
        except PromptTooLong as exc:
            raise _RequestError(ErrorCode.PROMPT_TOO_LONG.value, str(exc), exc.details()) from None
        except EngineClosed:
            raise _RequestError("unavailable", "the device process is stopping") from None

    def _train(self, identity: bytes, header: dict[str, Any]) -> None:
        from producer.contract import TrainRequest
        from workers.serving.onnx_export import ExportError, export_trained_classifier
        from workers.training.artifacts import LocalDirectoryStore
        from workers.training.errors import TrainingConfigError
        from workers.training.loop import run_training

        rid, job = header.get("rid"), str(header.get("job", ""))
        try:
            request = TrainRequest.model_validate(header["request"])

            def report(progress: Any) -> None:
                self._replies.send([identity, *ipc.pack({"rid": rid, "event": "progress",
                                                         "progress": progress.model_dump(mode="json")})])

            with self._training.computing(job):
                result = run_training(request, self.device, LocalDirectoryStore(self.settings.artifact_dir),
                                      job_id=job, on_progress=report, should_stop=lambda: self._is_cancelled(job),
                                      progress_interval_s=float(header.get("progress_interval_s", 1.0)))
                if request.export_onnx and not result.cancelled:
                    result = result.model_copy(update={"onnx_artifact": export_trained_classifier(
                        result.artifact, request.register_as or request.kind.value)})
            reply = ipc.pack({"rid": rid, "ok": True, "result": result.model_dump(mode="json")})
        except ExportError as exc:
            reply = ipc.error_reply(rid, ErrorCode.MODEL_ERROR.value,
                                    f"the trained model was not exported to ONNX: {exc}", {"artifact": result.artifact})
        except TrainingConfigError as exc:
            reply = ipc.error_reply(rid, ErrorCode.INVALID_INPUT.value, str(exc))
        except Exception as exc:  # noqa: BLE001 - a failed training job fails that job only
            reply = _failure(rid, exc, job)
        self._replies.send([identity, *reply])


    # --- loading and unloading models (on the lifecycle thread) --------------------------------

    def _load(self, identity: bytes, header: dict[str, Any]) -> None:
        """Load ``header["spec"]`` into status-board slot ``header["slot"]`` if it fits, warm it, and start
        serving it here; reply with its card, the memory it took and the seconds it took."""
        from workers.serving import memory_budget
        from workers.serving.models.loader import load_model

        rid, started = header.get("rid"), time.perf_counter()
        try:
            spec = ModelSpec.model_validate(header["spec"])
            if spec.name in self.residents:
                raise _RequestError(ErrorCode.ALREADY_LOADED.value, f"model {spec.name!r} is loaded already")
            needed, free = memory_budget.estimated_bytes(spec), memory_budget.available_bytes(self.device)
            if needed > free:
                raise _RequestError(ErrorCode.INSUFFICIENT_MEMORY.value,
                                    f"model {spec.name!r} needs about {needed / 2**20:.0f} MiB on {self.device}; "
                                    f"{free / 2**20:.0f} MiB are free",
                                    {"needed_bytes": needed, "available_bytes": free, "device": self.device,
                                     "size_factor": memory_budget.SIZE_FACTOR})
            before = memory_budget.in_use_bytes(self.device)
            impl, report = load_model(spec, self.device)
            resident = _Resident(spec, impl, report, int(header["slot"]), self.board, self.device)
            reply = ipc.pack({"rid": rid, "ok": True, "card": resident.card(), "estimated_bytes": needed,
                              "memory_bytes": max(0, memory_budget.in_use_bytes(self.device) - before),
                              "seconds": time.perf_counter() - started})
            self._retired.discard(spec.name)
            self.residents = {**self.residents, spec.name: resident}  # serving from here on
        except _RequestError as exc:
            reply = ipc.error_reply(rid, exc.code, str(exc), exc.details)
        except Exception as exc:  # noqa: BLE001 - a model that fails to load is refused; the others keep serving
            log.error("loading model %s failed: %s: %s", header.get("spec", {}).get("name"), type(exc).__name__, exc)
            reply = ipc.error_reply(rid, ErrorCode.MODEL_ERROR.value, f"{type(exc).__name__}: {exc}")
        self._replies.send([identity, *reply])

    def _unload(self, identity: bytes, header: dict[str, Any]) -> None:
        """Stop serving ``header["model"]``: its queued work is answered ``unavailable`` (handed back), its
        memory freed; reply with the bytes given back."""
        import gc

        from workers.serving import memory_budget

        rid, name = header.get("rid"), str(header.get("model"))
        resident = self.residents.get(name)
        if resident is None:
            self._replies.send([identity, *ipc.error_reply(rid, ErrorCode.NOT_LOADED.value,
                                                           f"model {name!r} is not loaded")])
            return
        before = memory_budget.in_use_bytes(self.device)
        self._retired.add(name)
        self.residents = {ref: other for ref, other in self.residents.items() if ref != name}
        resident.close(hand_back_queued=True)  # the launcher let its jobs drain first
        self.board.clear_computing(resident.slot)
        del resident
        gc.collect()
        memory_budget.release_freed_memory(self.device)
        log.info("unloaded model %s", name)
        self._replies.send([identity, *ipc.pack({"rid": rid, "ok": True, "memory_bytes": max(
            0, before - memory_budget.in_use_bytes(self.device))})])


class _RequestError(Exception):
    """A request refused before it reached a model (unknown model, wrong kind, no inputs)."""

    def __init__(self, code: str, message: str, details: dict[str, Any] | None = None):
        super().__init__(message)
        self.code, self.details = code, details or {}


def _generation_reply(rid: Any, request: Any, engine: Any, outcome: Any) -> list[bytes]:
    """The final reply for a generate job's ``Outcome``: its result, or why it has none."""
    from workers.serving.generation.sequence import Finish

    if outcome.finish.completed:
        return ipc.pack({"rid": rid, "ok": True, "result": {
            "model": request.model, "device": str(engine.device), "text": outcome.text,
            "tokens_generated": outcome.tokens_generated, "finish_reason": outcome.finish.value}})
    if outcome.finish is Finish.FAILED:
        return _failure(rid, outcome.error, outcome.job_id)
    code = {Finish.CANCELLED: "cancelled", Finish.EXPIRED: "expired", Finish.HANDED_BACK: "unavailable"}[outcome.finish]
    return ipc.error_reply(rid, code, f"generation ended: {outcome.finish.value}")


def _failure(rid: Any, exc: BaseException, job: str) -> list[bytes]:
    """The failure reply for an exception raised while computing a job."""
    if isinstance(exc, BatcherClosed):
        return ipc.error_reply(rid, "unavailable", "its model is being unloaded, or the device process is stopping")
    log.error("job %s failed on the device: %s: %s", job, type(exc).__name__, exc)
    code = ErrorCode.OUT_OF_MEMORY if is_out_of_memory(exc) else ErrorCode.MODEL_ERROR
    return ipc.error_reply(rid, code.value, f"{type(exc).__name__}: {exc}")


class _JobReply:
    """Collects the outputs of one infer job's items (in order) and replies once all are done."""

    def __init__(self, replies: _Replies, identity: bytes, rid: Any, futures: list[Future], works: list[_Work],
                 normalize: bool, embed: bool, on_reply: Any = None):
        self._replies, self._identity, self._rid = replies, identity, rid
        self._futures, self._works, self._normalize, self._embed = futures, works, normalize, embed
        self._on_reply = on_reply
        self._left = len(futures)
        self._lock = threading.Lock()
        for future in futures:
            future.add_done_callback(self._one_done)

    def _one_done(self, _future: Future) -> None:
        with self._lock:
            self._left -= 1
            if self._left:
                return
        failed = next((f.exception() for f in self._futures if f.exception() is not None), None)
        try:
            frames = _failure(self._rid, failed, "") if failed is not None else self._rows()
            self._replies.send([self._identity, *frames])
        finally:
            if self._on_reply is not None:
                self._on_reply()

    def _rows(self) -> list[bytes]:
        import torch

        rows = torch.stack([future.result() for future in self._futures]).to(torch.float32)
        if self._embed and self._normalize:
            rows = torch.nn.functional.normalize(rows, p=2, dim=1)
        shape, raw = ipc.encode_matrix(np.asarray(rows.cpu().numpy()))
        header: dict[str, Any] = {"rid": self._rid, "ok": True, "shape": shape}
        if self._works[0].batch:
            header["batch"] = self._works[0].batch
        return ipc.pack(header, raw)


def device_main(config: DeviceConfig, ready: Any) -> None:
    """Entry point of the spawned device process. ``ready`` is a multiprocessing Connection:
    it gets ``{"ok": True, "device", "identity", "cards", "refused"}`` once the models are loaded
    (``refused``: model name -> why, for models whose files cannot be served), or
    ``{"ok": False, "error"}`` (and the process exits with code 3) if loading failed."""
    from workers.observability.logs import configure_logging
    from workers.process.parent_watch import die_with_parent

    die_with_parent()
    settings = WorkerSettings(**config.settings)
    configure_logging(settings.log_level)
    board = StatusBoard.attach(config.board_path)
    board.set_device(State.STARTING, os.getpid())
    server: DeviceServer | None = None

    def on_sigterm(_signum: int, _frame: Any) -> None:
        if server is not None:
            server.stop()
        else:
            raise SystemExit(0)

    signal.signal(signal.SIGTERM, on_sigterm)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the launcher decides when the device stops
    try:
        import torch

        from workers.process.devices import choose_device, device_identity
        from workers.serving.models.loader import load_model
        from workers.serving.refusal import ModelRefused

        if settings.torch_threads:
            torch.set_num_threads(settings.torch_threads)
        choice = choose_device(config.device)
        log.info("device %s: %s", choice.device, choice.reason)
        residents: dict[str, _Resident] = {}
        refused: dict[str, str] = {}
        log.info("loading %d model(s) on %s: %s", len(config.specs), choice.device,
                 ", ".join(str(raw_spec["name"]) for raw_spec in config.specs) or "-")
        for slot, raw_spec in enumerate(config.specs):
            spec = ModelSpec.model_validate(raw_spec)
            try:
                impl, report = load_model(spec, choice.device)
            except ModelRefused as exc:  # this model's files cannot be served: serve the others
                refused[spec.name] = f"{type(exc).__name__}: {exc}"
                log.error("refusing model %s: %s", spec.name, refused[spec.name])
                continue
            residents[spec.name] = _Resident(spec, impl, report, slot, board, choice.device)
        server = DeviceServer(residents, config.address, board, settings, choice.device)
        from workers.observability import telemetry
        from workers.process.group_probes import start_process_metrics_server

        identity = device_identity(choice.device)
        device_telemetry = telemetry.setup_device(
            choice.device, models={name: r.spec.kind.value for name, r in residents.items()},
            device_name=identity["name"])
        metrics_port = start_process_metrics_server() or 0
    except BaseException as exc:  # noqa: BLE001 - report why, then exit: the launcher stops the group
        ipc.send_json(ready, {"ok": False, "error": f"{type(exc).__name__}: {exc}"})
        board.set_device(State.FAILED)
        log.error("device process cannot start: %s: %s", type(exc).__name__, exc)
        raise SystemExit(3) from None
    board.set_device(State.READY, metrics_port=metrics_port)
    ipc.send_json(ready, {"ok": True, "device": choice.device, "identity": identity, "refused": refused,
                "cards": [resident.card() for resident in residents.values()]})
    try:
        server.serve()
    finally:
        board.set_device(State.STOPPED)
        device_telemetry.shutdown()
        log.info("device process stopped")
