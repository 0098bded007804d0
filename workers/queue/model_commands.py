"""The ``fleet_models`` remote-control command: how model lifecycle commands reach a worker group.

Registered in every consumer process with Celery's documented extension point for custom
remote-control commands (``celery.worker.control.control_command``). A sender addresses a group
by its node name, which its consumer 0 carries; consumer 0 checks the command
(``producer.contract.lifecycle.ModelCommand``), passes it to the group's launcher, which carries
it out (workers/process/model_lifecycle.py), and answers at once ``{"accepted": true}``: the
handler runs in the consumer's event loop, which must go on receiving jobs while the model loads.
The launcher pushes the final reply onto ``fleet:model-replies:<command id>``. A malformed command is
answered at once with a ``refused`` reply. Other consumers of a group (``<name>-c<i>@host``) are not
addressed; one reached by a broadcast to every node says so and does nothing.

``serve_trained_model`` is the sending side, for a training job with ``serve_on``: it asks the
groups started with ``--serve-trained`` on such a device to load the model the job registered.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import redis
from celery import Celery
from celery.worker.control import control_command
from pydantic import ValidationError

from producer.contract import ErrorCode
from producer.contract.lifecycle import MODEL_COMMAND, ModelCommand, ModelCommandReply, ModelOp, ReplyStatus
from producer.core.model_control import new_command, parse_workers, trained_model_servers
from producer.model_control import run_command
from workers.process.health import read_heartbeats

log = logging.getLogger(__name__)


def accept(raw: Any, worker: str, forward: Callable[[dict[str, Any]], None] | None) -> dict[str, Any]:
    """The immediate answer to a ``fleet_models`` command (``raw``: its ``command`` argument) at group
    ``worker``; ``forward`` passes a valid command on (None: this consumer is not the group's mailbox)."""
    if forward is None:
        return {"ignored": f"not {worker}'s mailbox: send model commands to {worker}"}
    try:
        command = ModelCommand.model_validate(raw)
    except ValidationError as exc:
        errors = [{"loc": list(e["loc"]), "msg": e["msg"], "type": e["type"]} for e in exc.errors()]
        model = str(raw.get("model", "")) if isinstance(raw, dict) else ""
        reply = ModelCommandReply(worker=worker, op=_op_of(raw), model=model, status=ReplyStatus.REFUSED,
                                  code=ErrorCode.INVALID_INPUT.value, message="invalid model command",
                                  details={"errors": errors})
        return reply.model_dump(mode="json")
    forward(command.model_dump(mode="json"))
    log.info("model command %s %s passed to the launcher", command.op.value, command.target)
    return {"accepted": True}


def install_model_commands(worker: str, forward: Callable[[dict[str, Any]], None] | None) -> None:
    """Register ``fleet_models`` in this process for group ``worker`` (``forward``: consumer 0's pipe to the
    launcher; None in the group's other consumers)."""

    @control_command(name=MODEL_COMMAND, args=[("command", dict)], signature="<command>")
    def fleet_models(state: Any, command: Any = None, **_: Any) -> dict[str, Any]:
        """Load, unload or switch a model on this worker group (Fleet's model lifecycle)."""
        return accept(command, worker, forward)


def _op_of(raw: Any) -> ModelOp | None:
    try:
        return ModelOp(raw.get("op"))
    except (ValueError, AttributeError):
        return None


#: How long a training job waits for the workers loading the model it registered (s); one still loading then is
#: reported ``no_reply`` (it goes on loading).
SERVE_WAIT_S = 120.0


def serve_trained_model(app: Celery, redis_client: redis.Redis, name: str, serve_on: str) -> list[ModelCommandReply]:
    """Ask every live group started with ``--serve-trained`` on a device ``serve_on`` asks for to load ``name``;
    their replies (none when no such group is live: the model waits for one to be told, or started with it)."""
    targets = trained_model_servers(parse_workers(read_heartbeats(redis_client)), serve_on)
    if not targets:
        log.warning("no live --serve-trained worker on %s to serve %s", serve_on, name)
        return []
    return run_command(app, redis_client, new_command(ModelOp.LOAD, name), targets, SERVE_WAIT_S)
