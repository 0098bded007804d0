"""Model lifecycle commands: load, unload and switch models on running workers.

A command is a Celery remote-control command (``MODEL_COMMAND``, one JSON argument ``command``:
a ``ModelCommand``) addressed to worker groups by their node name (the name in their heartbeat).
Each addressed group answers twice:

1. at once, as the control command's reply: ``{"accepted": true}``, or a ``ModelCommandReply``
   with ``status`` ``refused`` when it cannot even take the command (a malformed one);
2. when it has done the work, with one ``ModelCommandReply`` JSON pushed onto the Redis list
   ``fleet:model-replies:<command id>`` (``producer.keys.model_replies``; it expires an hour later).

Work takes seconds (a model loads and warms up, jobs in flight drain), and a control command's
handler runs in the consumer's event loop, which must keep receiving jobs meanwhile: hence the
second answer through Redis. docs/PROTOCOL.md ("Model lifecycle") describes both. No torch here.
"""

from __future__ import annotations

from enum import Enum
from typing import Annotated, Any, Literal

from pydantic import Field, StrictFloat, StrictInt, StrictStr, model_validator

from producer.contract.common import MODEL_VERSION_PATTERN, PROTOCOL_VERSION, ErrorCode, Finite, ModelRef, WireModel

__all__ = ["MODEL_COMMAND", "ModelOp", "ModelCommand", "ReplyStatus", "ModelCommandReply", "ServeOn",
           "SETTLED_REFUSALS", "serves_on"]

#: The Celery remote-control command that carries a ``ModelCommand`` to a worker group.
MODEL_COMMAND = "fleet_models"

#: Where ``serve_on`` (a training job's) asks the trained model to be served: workers whose device is a
#: CPU, any CUDA GPU, an Apple GPU, or any of them.
ServeOn = Literal["cpu", "cuda", "mps", "any"]

CommandId = Annotated[StrictStr, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.:\-]{0,127}$")]
Version = Annotated[StrictStr, Field(pattern=MODEL_VERSION_PATTERN)]


def serves_on(serve_on: str, device: str | None) -> bool:
    """Whether a worker on ``device`` (``cpu``, ``cuda:0``, ``mps``) is one ``serve_on`` asks for."""
    return device is not None and (serve_on == "any" or device.split(":")[0] == serve_on)


class ModelOp(str, Enum):
    """What a command asks of a worker group.

    * ``load`` ``model`` (a name or ``name@version`` from the worker's registry, or one a training job
      registered): load and warm it beside the models it serves, then consume its queues;
    * ``unload`` ``model``: stop consuming its queues, let its jobs in flight finish (those left after
      the drain grace are handed back to the queue), then free its memory. A bare name unloads every
      version of it;
    * ``switch`` ``model`` (a bare name) ``to`` a version: load that version (if not loaded), make it
      the current one (unpinned jobs go to it), then drain and unload the other versions.
    """

    LOAD = "load"
    UNLOAD = "unload"
    SWITCH = "switch"


class ModelCommand(WireModel):
    """One lifecycle command. ``id`` names the Redis list its final replies go to.

    ``drain_grace_s``: for ``unload`` and ``switch``, how long the retiring model's jobs in flight
    may take before they are handed back (default: the worker's ``FLEET_DRAIN_GRACE_S``).
    """

    v: StrictInt = PROTOCOL_VERSION
    id: CommandId
    op: ModelOp
    model: ModelRef
    to: Version | None = None
    drain_grace_s: Annotated[StrictFloat | StrictInt, Finite, Field(ge=0, le=86_400)] | None = None

    @model_validator(mode="after")
    def _target_fits_op(self) -> ModelCommand:
        if self.op is ModelOp.SWITCH:
            if self.to is None:
                raise ValueError("switch needs the version to switch to (to)")
            if "@" in self.model:
                raise ValueError("switch names the model without a version; the version goes in to")
        elif self.to is not None:
            raise ValueError(f"to is for switch only, not {self.op.value}")
        return self

    @property
    def target(self) -> str:
        """The model reference the command ends up serving (``switch``: ``model@to``) or removing."""
        return f"{self.model}@{self.to}" if self.op is ModelOp.SWITCH else self.model


class ReplyStatus(str, Enum):
    """How a command ended on one worker group (``no_reply``: the client heard nothing in time)."""

    LOADED = "loaded"
    UNLOADED = "unloaded"
    SWITCHED = "switched"
    REFUSED = "refused"
    NO_REPLY = "no_reply"


#: Refusals that mean the worker is already as the command wanted it (a load of a model it serves, an
#: unload of one it does not): ``fleet models load|unload`` counts them as success.
SETTLED_REFUSALS = {ModelOp.LOAD: ErrorCode.ALREADY_LOADED.value, ModelOp.UNLOAD: ErrorCode.NOT_LOADED.value}


class ModelCommandReply(WireModel):
    """What one worker group did with a command.

    ``model``: the model reference acted on (for a bare-name load of an unversioned model, the name).
    ``device``: where it is (or was) loaded. ``memory_bytes``: device memory the model took (load,
    switch: measured around the load) or gave back (unload); on CPU the device process's resident
    memory, on CUDA the allocator's. ``seconds``: wall time the worker took, from receiving the
    command to consuming (load) or freeing (unload). ``current``: the model's current version on that
    worker afterwards, for versioned models (None: no version is current there).
    A refusal has ``code`` (an ``ErrorCode`` value: ``insufficient_memory``, ``unknown_model``,
    ``already_loaded``, ``not_loaded``, ``too_many_models``, ``wrong_model_kind``, ``model_error``,
    ``invalid_input``), ``message`` and ``details``; the worker keeps serving what it served.
    """

    worker: str
    #: None only when the command was too malformed to tell.
    op: ModelOp | None
    model: str
    status: ReplyStatus
    device: str | None = None
    memory_bytes: int | None = None
    seconds: float | None = None
    current: str | None = None
    code: str | None = None
    message: str = ""
    details: dict[str, Any] = Field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """The command was carried out."""
        return self.status in (ReplyStatus.LOADED, ReplyStatus.UNLOADED, ReplyStatus.SWITCHED)

    @property
    def settled(self) -> bool:
        """Carried out, or refused because the worker already was as asked (``SETTLED_REFUSALS``)."""
        return self.ok or (self.status is ReplyStatus.REFUSED and self.op is not None
                           and self.code == SETTLED_REFUSALS.get(self.op))
