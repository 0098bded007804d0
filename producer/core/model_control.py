"""Model lifecycle commands, client side, without I/O: what a command is, which workers it goes to, and
what their answers say (docs/PROTOCOL.md, "Model lifecycle").

A command is sent as a Celery broadcast of ``fleet_models`` to the chosen worker groups' node names;
each group answers at once (``{"accepted": true}``, or a refusal) and, when done, pushes its
``ModelCommandReply`` onto ``fleet:model-replies:<command id>``. ``Replies`` gathers both answers of
every group and tells the I/O loop what to wait for next. Both clients (``producer/model_control.py``,
``producer/async_model_control.py``) and the training task that serves its model use it.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Any

from pydantic import ValidationError

from producer import keys
from producer.contract import split_model_ref
from producer.contract.lifecycle import MODEL_COMMAND, ModelCommand, ModelCommandReply, ModelOp, ReplyStatus, serves_on
from producer.core.requests import validate_request
from producer.errors import NoMatchingWorkerError

#: How long a command's first answers (one per worker group, sent by its event loop) may take (s).
ACK_TIMEOUT_S = 5.0
#: How long a client waits for the final replies by default (s): loading a large model on a busy device.
COMMAND_TIMEOUT_S = 300.0


@dataclass(frozen=True)
class WorkerView:
    """A live worker group as its heartbeat shows it."""

    name: str
    device: str | None
    models: frozenset[str]
    serve_trained: bool = False

    def serves_name(self, name: str) -> bool:
        """Whether it serves model ``name`` (any version of it)."""
        return any(split_model_ref(ref)[0] == name for ref in self.models)


def parse_workers(heartbeats: Iterable[bytes | str | Mapping[str, Any] | None]) -> list[WorkerView]:
    """The live worker groups in these heartbeats (JSON bodies, or already parsed; None: gone; malformed
    ones are left out), by name."""
    workers = []
    for body in heartbeats:
        if body is None:
            continue
        try:
            beat = body if isinstance(body, Mapping) else json.loads(body)
            workers.append(WorkerView(str(beat["name"]), beat.get("device"),
                                      frozenset(m for m in beat.get("models", []) if isinstance(m, str)),
                                      bool(beat.get("serve_trained"))))
        except (ValueError, TypeError, KeyError, AttributeError):
            continue
    return sorted(workers, key=lambda worker: worker.name)


def new_command(op: ModelOp, model: str, to: str | None = None, drain_grace_s: float | None = None) -> ModelCommand:
    """A validated command with a fresh id (``InvalidRequestError`` naming what is wrong)."""
    fields: dict[str, Any] = {"id": uuid.uuid4().hex, "op": op, "model": model}
    if to is not None:
        fields["to"] = to
    if drain_grace_s is not None:
        fields["drain_grace_s"] = drain_grace_s
    command = validate_request(ModelCommand, fields)
    assert isinstance(command, ModelCommand)
    return command


def select_workers(workers: Sequence[WorkerView], command: ModelCommand,
                   selector: str | Sequence[str] | None = None) -> list[str]:
    """The node names ``command`` goes to.

    ``selector``: worker name patterns (``fnmatch``, matched against the name with and without its
    ``@host``; a string may hold several, comma-separated). Without one: every live worker for ``load``,
    the workers serving the model for ``unload`` (a bare name: any version of it) and ``switch``.
    Raises ``NoMatchingWorkerError`` when none is left.
    """
    if selector is not None:
        patterns = [p.strip() for p in (selector.split(",") if isinstance(selector, str) else selector) if p.strip()]
        chosen = [w.name for w in workers if any(fnmatchcase(w.name, p) or fnmatchcase(w.name.split("@")[0], p)
                                                 for p in patterns)]
        if not chosen:
            names = ", ".join(w.name for w in workers) or "none"
            raise NoMatchingWorkerError(f"no live worker matches {', '.join(patterns) or 'an empty selector'} "
                                        f"(live workers: {names})")
        return chosen
    if command.op is ModelOp.LOAD:
        chosen = [w.name for w in workers]
    elif "@" in command.model:
        chosen = [w.name for w in workers if command.model in w.models]
    else:
        chosen = [w.name for w in workers if w.serves_name(command.model)]
    if not chosen:
        what = "no worker is live" if command.op is ModelOp.LOAD else f"no live worker serves {command.model}"
        raise NoMatchingWorkerError(f"{what}: nothing to {command.op.value}")
    return chosen


def trained_model_servers(workers: Sequence[WorkerView], serve_on: str) -> list[str]:
    """The groups started with ``--serve-trained`` on a device ``serve_on`` asks for (``cpu``, ``cuda``, ...)."""
    return [w.name for w in workers if w.serve_trained and serves_on(serve_on, w.device)]


#: The longest one BLPOP for replies blocks (s), below every Fleet connection's socket timeout.
REPLY_POLL_S = 1.0


@dataclass
class Replies:
    """The answers of the worker groups ``targets`` to ``command``, as they come, until ``deadline``
    (monotonic seconds).

    Send ``broadcast()`` (keyword arguments of Celery's ``app.control.broadcast``) and feed its answers
    to ``accept_acks``; then, while ``next_wait(now)`` gives a time, BLPOP ``key`` that long and feed
    what comes to ``accept_reply``. ``result`` gives one reply per target, in target order (``no_reply``
    for a group that said nothing in time).
    """

    command: ModelCommand
    targets: list[str]
    deadline: float
    _final: dict[str, ModelCommandReply] = field(default_factory=dict)
    _accepted: set[str] = field(default_factory=set)

    @property
    def key(self) -> str:
        """The Redis list the final replies arrive on."""
        return keys.model_replies(self.command.id)

    def broadcast(self, now: float, ack_timeout_s: float = ACK_TIMEOUT_S) -> dict[str, Any]:
        """The arguments of the one ``app.control.broadcast`` call that sends the command."""
        return {"command": MODEL_COMMAND, "arguments": {"command": self.command.model_dump(mode="json")},
                "destination": self.targets, "reply": True, "limit": len(self.targets),
                "timeout": max(0.0, min(ack_timeout_s, self.deadline - now))}

    def next_wait(self, now: float) -> float | None:
        """Seconds to block for the next reply, or None when every group that took the command replied
        (or the time is up)."""
        left = self.deadline - now
        return min(REPLY_POLL_S, left) if self.waiting and left > 0 else None

    def accept_acks(self, acks: Iterable[dict[str, Any]]) -> None:
        """The control command's replies: ``[{node name: answer}, ...]``."""
        for ack in acks:
            for node, answer in ack.items():
                if node not in self.targets or not isinstance(answer, dict):
                    continue
                if answer.get("accepted"):
                    self._accepted.add(node)
                elif "status" in answer:
                    self._take(answer)

    def accept_reply(self, raw: bytes | str) -> None:
        """One final reply from the command's Redis list (a malformed one is ignored)."""
        try:
            self._take(json.loads(raw))
        except (ValueError, TypeError):
            return

    def _take(self, answer: dict[str, Any]) -> None:
        try:
            reply = ModelCommandReply.model_validate(answer)
        except ValidationError:
            return
        if reply.worker in self.targets:
            self._final[reply.worker] = reply

    @property
    def waiting(self) -> set[str]:
        """Groups that took the command and have not replied yet."""
        return self._accepted - set(self._final)

    def result(self) -> list[ModelCommandReply]:
        silent = {"accepted": "no final reply within the time waited (the command may still complete)",
                  "unheard": "the worker did not answer the command (not running, or not consuming)"}
        replies = []
        for node in self.targets:
            reply = self._final.get(node)
            if reply is None:
                reply = ModelCommandReply(worker=node, op=self.command.op, model=self.command.target,
                                          status=ReplyStatus.NO_REPLY,
                                          message=silent["accepted" if node in self._accepted else "unheard"])
            replies.append(reply)
        return replies
