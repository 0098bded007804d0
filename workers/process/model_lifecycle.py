"""A worker group's models over its life: load, unload and switch them while the group serves.

Runs in the group's launcher (workers/process/worker_main.py), which owns the group's serving
plan (workers/serving/serving_plan.py), its heartbeat and its Redis record. Commands
(``producer.contract.lifecycle.ModelCommand``) reach consumer 0 as Celery remote-control commands;
it passes them here (workers/queue/model_commands.py). They run one at a time on one thread, so
the group keeps serving meanwhile, and each ends with one ``ModelCommandReply`` pushed onto
``fleet:model-replies:<command id>``.

* **load** ``ref``: from the registry file or the models training jobs registered (read afresh);
  refused ``unknown_model``, ``already_loaded``, ``wrong_model_kind`` (another version of the name
  serves another kind), ``too_many_models`` (no free status-board slot; the last one is training's),
  or by the device process: ``insufficient_memory`` (checked before loading), ``model_error``. The
  device loads and warms it beside the serving models; then one new plan gives every consumer its
  card and its queues, and once every consumer has applied it, the heartbeat announces it.
* **unload** ``ref`` (a bare name of a versioned model: every version): one plan stops every
  consumer consuming its queues (a name whose current version goes passes to another loaded
  version, if any); its jobs in flight get the drain grace to finish (none left in any consumer nor
  in the device), then the device frees it (work still queued there is handed back, and jobs a
  consumer received but has not started go back to their queue when they start), then a last plan
  drops its card. Refused ``not_loaded``.
* **switch** ``name`` ``to`` ``version``: load ``name@version`` if needed, then one plan makes it
  consumed and current and stops the other versions' queues (each consumer flips in one turn of its
  event loop: the name's queue is never left unconsumed), then the others drain and are freed.

After every change the group's record ``fleet:worker-models:<name>`` holds what it serves (what a
restarted group serves again: ``restored_models``).
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import redis

from producer import keys
from producer.contract import ErrorCode, split_model_ref
from producer.contract.lifecycle import ModelCommand, ModelCommandReply, ModelOp, ReplyStatus
from producer.redis_connection import text
from workers.process.status_board import COMPUTING_SLOTS, StatusBoard
from workers.serving.registry import ModelSpec, load_registry, with_trained_models
from workers.serving.serving_plan import ServingPlan
from workers.settings import WorkerSettings

log = logging.getLogger("fleet.lifecycle")

#: Status-board slots models may take (the last one is the training job's).
MODEL_SLOTS = COMPUTING_SLOTS - 1
#: Seconds a replies list lives after its last reply.
REPLIES_TTL_S = 3600
#: The longest a device load may take (s): a big model on a busy host.
LOAD_TIMEOUT_S = 1800.0
#: How long every consumer may take to apply a new plan before the command goes on without it (s).
APPLY_TIMEOUT_S = 60.0
#: How often a waiting command looks at the status board (s).
POLL_S = 0.05


def current_registry(redis_client: redis.Redis, settings: WorkerSettings) -> dict[str, ModelSpec]:
    """The registry file plus every model training jobs registered, read now (``RegistryError`` if malformed)."""
    trained = {text(name): text(raw) for name, raw in redis_client.hgetall(keys.TRAINED_MODELS).items()}
    return with_trained_models(load_registry(settings.model_registry), trained)


@dataclass(frozen=True)
class Restored:
    """What a group starts serving: the model references and each name's current reference."""

    models: list[str]
    current: dict[str, str]
    #: Why (for the log): the record, or --models.
    source: str


def restored_models(redis_client: redis.Redis, worker: str, models: list[str], registry: dict[str, ModelSpec],
                    reset: bool) -> Restored:
    """The models a group named ``worker`` started with ``--models models`` serves.

    Its record wins when it was written by a group started with the same ``--models`` (so models loaded,
    switched or unloaded at run time survive a restart); a different ``--models`` (the deployment
    changed) or ``reset`` (``--reset-models``) start from ``--models``. Recorded models the registry no
    longer has are left out, with a warning.
    """
    raw = None if reset else redis_client.get(keys.worker_models(worker))
    record = json.loads(raw) if raw else None
    if record is None or sorted(record.get("started_with") or []) != sorted(models):
        return Restored(list(models), {}, "--models")
    kept = [ref for ref in record.get("models", []) if ref in registry]
    for ref in set(record.get("models", [])) - set(kept):
        log.warning("model %s served before the restart is no longer in the registry; not loading it", ref)
    return Restored(kept, dict(record.get("current", {})), f"the record {keys.worker_models(worker)}")


class _Refused(Exception):
    """The command cannot be carried out here (``code``: an ``ErrorCode`` value); nothing was changed."""

    def __init__(self, code: str, message: str, details: dict[str, Any] | None = None):
        super().__init__(message)
        self.code, self.details = code, details or {}


class ModelLifecycle:
    """Carries out the model commands of one worker group.

    ``device``: a ``DeviceClient`` to the group's device process; ``plan``: the plan the group started
    with; ``slots``: its models' status-board slots; ``publish(plan)``: sends a plan to every consumer
    (and to any consumer started later); ``announce(plan)``: puts it in the heartbeat. ``started_with``:
    the group's ``--models`` (kept in its record).
    """

    def __init__(self, name: str, settings: WorkerSettings, redis_client: redis.Redis, device: Any,
                 board: StatusBoard, plan: ServingPlan, slots: dict[str, int],
                 publish: Callable[[ServingPlan], None], announce: Callable[[ServingPlan], None],
                 started_with: list[str]):
        self.name, self.settings, self.redis = name, settings, redis_client
        self._device, self._board = device, board
        self.plan, self.slots = plan, dict(slots)
        self._publish, self._announce = publish, announce
        self._started_with = started_with
        self._commands: queue.SimpleQueue[dict[str, Any] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._loop, name="model-lifecycle", daemon=True)

    def start(self) -> ModelLifecycle:
        self._record()
        self._thread.start()
        return self

    def stop(self) -> None:
        """Take no more commands (one running finishes on its own; the process is exiting)."""
        self._commands.put(None)

    def submit(self, command: dict[str, Any]) -> None:
        """Queue ``command`` (a ``ModelCommand`` as JSON); it runs after those before it."""
        self._commands.put(command)

    # --- the thread ----------------------------------------------------------------------------

    def _loop(self) -> None:
        while (raw := self._commands.get()) is not None:
            command = ModelCommand.model_validate(raw)
            reply = self.execute(command)
            log.info("model command %s %s: %s%s", command.op.value, command.target, reply.status.value,
                     f" ({reply.code}: {reply.message})" if reply.code else "")
            try:
                with self.redis.pipeline(transaction=False) as pipe:
                    pipe.rpush(keys.model_replies(command.id), reply.model_dump_json())
                    pipe.expire(keys.model_replies(command.id), REPLIES_TTL_S)
                    pipe.execute()
            except redis.RedisError as exc:
                log.error("could not store the reply to model command %s: %s", command.id, exc)

    def execute(self, command: ModelCommand) -> ModelCommandReply:
        """Carry out ``command``; its reply (a refusal leaves what the group serves as it was)."""
        started = time.monotonic()
        try:
            if command.op is ModelOp.LOAD:
                fields = self._load(command.model)
            elif command.op is ModelOp.UNLOAD:
                fields = self._unload(command.model, self._grace(command))
            else:
                fields = self._switch(command.model, command.target, self._grace(command))
        except _Refused as exc:
            return ModelCommandReply(worker=self.name, op=command.op, model=command.target,
                                     status=ReplyStatus.REFUSED, code=exc.code, message=str(exc),
                                     details=exc.details, seconds=time.monotonic() - started)
        except Exception as exc:  # logged; the command gets an answer and the next ones still run
            log.exception("model command %s %s failed", command.op.value, command.target)
            return ModelCommandReply(worker=self.name, op=command.op, model=command.target,
                                     status=ReplyStatus.REFUSED, code=ErrorCode.INTERNAL.value,
                                     message=f"{type(exc).__name__}: {exc}", seconds=time.monotonic() - started)
        name = split_model_ref(command.target)[0]
        return ModelCommandReply(worker=self.name, op=command.op, model=command.target,
                                 seconds=time.monotonic() - started, current=self.plan.current.get(name), **fields)

    def _grace(self, command: ModelCommand) -> float:
        return self.settings.drain_grace_s if command.drain_grace_s is None else float(command.drain_grace_s)

    # --- the three commands ----------------------------------------------------------------------

    def _load(self, ref: str) -> dict[str, Any]:
        if ref in self.plan.cards:
            raise _Refused(ErrorCode.ALREADY_LOADED.value, f"{self.name} serves {ref} already")
        loaded = self._load_on_device(ref)
        self._change(self.plan.with_card(loaded["card"]).consume(ref, make_current=False))
        self._record()
        return {"status": ReplyStatus.LOADED, "device": loaded["card"]["device"],
                "memory_bytes": loaded["memory_bytes"],
                "details": {"estimated_bytes": loaded["estimated_bytes"], "load_s": loaded["seconds"]}}

    def _unload(self, ref: str, grace_s: float) -> dict[str, Any]:
        name, version = split_model_ref(ref)
        refs = {ref} if version or ref in self.plan.cards else set(self.plan.versions_of(name))
        if not refs & set(self.plan.cards):
            raise _Refused(ErrorCode.NOT_LOADED.value, f"{self.name} does not serve {ref}",
                           {"served": sorted(self.plan.cards)})
        staying = [other for other in self.plan.versions_of(name) if other not in refs and other in self.plan.consuming]
        successor = staying[-1] if self.plan.current.get(name) in refs and staying else None
        self._change(self.plan.retire(refs, successor))
        drained = self._drain(refs, grace_s)
        freed = self._free(refs)
        return {"status": ReplyStatus.UNLOADED, "memory_bytes": freed, "details": {"drained": drained}}

    def _switch(self, name: str, target: str, grace_s: float) -> dict[str, Any]:
        old = {ref for ref in self.plan.versions_of(name) if ref != target}
        if not old and target not in self.plan.cards:
            raise _Refused(ErrorCode.NOT_LOADED.value, f"{self.name} serves no version of {name}; load {target}",
                           {"served": sorted(self.plan.cards)})
        plan = self.plan
        fields: dict[str, Any] = {"status": ReplyStatus.SWITCHED}
        if target not in plan.cards:
            loaded = self._load_on_device(target)
            plan = plan.with_card(loaded["card"])
            fields.update(device=loaded["card"]["device"], memory_bytes=loaded["memory_bytes"],
                          details={"estimated_bytes": loaded["estimated_bytes"], "load_s": loaded["seconds"]})
        self._change(plan.consume(target, make_current=True).retire(old))
        drained = self._drain(old, grace_s)
        self._free(old)
        fields.setdefault("device", self.plan.cards[target]["device"])
        fields["details"] = {**fields.get("details", {}), "drained": drained, "unloaded": sorted(old)}
        return fields

    # --- steps -----------------------------------------------------------------------------------

    def _load_on_device(self, ref: str) -> dict[str, Any]:
        """Check ``ref`` can be loaded here, load it in the device process; the device's reply."""
        try:
            registry = current_registry(self.redis, self.settings)
        except (ValueError, redis.RedisError) as exc:
            raise _Refused(ErrorCode.UNKNOWN_MODEL.value, f"the model registry cannot be read: {exc}") from None
        spec = registry.get(ref)
        if spec is None:
            versions = sorted(other for other in registry if split_model_ref(other)[0] == ref)
            hint = f"; name a version: {', '.join(versions)}" if versions else ""
            raise _Refused(ErrorCode.UNKNOWN_MODEL.value, f"model {ref!r} is not in the registry{hint}",
                           {"versions": versions} if versions else {})
        kinds = {self.plan.cards[other]["kind"] for other in self.plan.versions_of(spec.base_name)}
        if kinds - {spec.kind.value}:
            raise _Refused(ErrorCode.WRONG_MODEL_KIND.value,
                           f"{ref} serves {spec.kind.value} jobs; the loaded versions of {spec.base_name} serve "
                           f"{', '.join(sorted(kinds))} jobs")
        free = sorted(set(range(MODEL_SLOTS)) - set(self.slots.values()))
        if not free:
            raise _Refused(ErrorCode.TOO_MANY_MODELS.value, f"{self.name} holds {MODEL_SLOTS} models, the most it can",
                           {"served": sorted(self.plan.cards)})
        reply, _ = self._device.request({"op": "load", "spec": spec.model_dump(mode="json"), "slot": free[0]},
                                        timeout_s=LOAD_TIMEOUT_S)
        if not reply.get("ok"):
            error = reply.get("error") or {}
            raise _Refused(error.get("code", ErrorCode.MODEL_ERROR.value), error.get("message", "load failed"),
                           error.get("details"))
        self.slots[ref] = free[0]
        return reply

    def _change(self, plan: ServingPlan) -> None:
        """Make ``plan`` the group's: every consumer applies it (waited for), then the heartbeat shows it."""
        self.plan = plan
        self._publish(plan)
        deadline = time.monotonic() + APPLY_TIMEOUT_S
        while any(c.plan_version < plan.version for c in self._board.all_consumers()):
            if time.monotonic() >= deadline:
                log.warning("not every consumer applied serving plan %d within %.0f s; going on", plan.version,
                            APPLY_TIMEOUT_S)
                break
            time.sleep(POLL_S)
        self._announce(plan)

    def _drain(self, refs: set[str], grace_s: float) -> bool:
        """Wait until no consumer holds a job of a dropped queue and the device computes none of ``refs``,
        at most ``grace_s`` seconds; True if they drained."""
        deadline = time.monotonic() + grace_s
        while True:
            lingering = sum(c.lingering for c in self._board.all_consumers())
            if not lingering and not any(self._device_jobs(ref) for ref in refs):
                return True
            if time.monotonic() >= deadline:
                log.warning("drain grace of %.1f s over for %s: handing the rest of their jobs back",
                            grace_s, ", ".join(sorted(refs)))
                return False
            time.sleep(POLL_S)

    def _device_jobs(self, ref: str) -> int:
        reply, _ = self._device.request({"op": "busy", "model": ref}, timeout_s=10.0)
        return int(reply.get("jobs", 0))

    def _free(self, refs: set[str]) -> int:
        """Unload ``refs`` in the device, drop their cards, record; the bytes given back."""
        freed = 0
        for ref in sorted(refs):
            reply, _ = self._device.request({"op": "unload", "model": ref}, timeout_s=60.0)
            freed += int(reply.get("memory_bytes", 0))
            self.slots.pop(ref, None)
        self._change(self.plan.without(refs))
        self._record()
        return freed

    def _record(self) -> None:
        """Record what the group serves now (``fleet:worker-models:<name>``, read by ``restored_models``)."""
        record = {"models": sorted(self.plan.consuming), "current": dict(self.plan.current),
                  "started_with": self._started_with, "at": time.time()}
        try:
            self.redis.set(keys.worker_models(self.name), json.dumps(record))
        except redis.RedisError as exc:
            log.error("could not record the models of %s: %s", self.name, exc)
