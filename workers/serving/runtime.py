"""The per-process state of a consumer: what the device process serves and how to reach it.

Built once in each consumer process (workers/process/consumer_main.py) from the group's serving
plan (workers/serving/serving_plan.py), before the process consumes, and changed in place when a
model is loaded, switched or unloaded while it runs (``adopt``, workers/serving/plan_follower.py);
tasks reach it through ``current()``. A consumer never imports torch: the models live in the
device process, and here each model is its card (kind, labels, dimension, tokenizer file) plus a
``TextEncoder`` for text models.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from producer.contract import ErrorCode, ModelKind
from producer.errors import JobFailedError
from workers.serving.device_client import DeviceClient, DeviceLost
from workers.serving.serving_plan import ServingPlan
from workers.serving.tokenization import TextEncoder
from workers.settings import WorkerSettings


@dataclass(frozen=True)
class ModelCard:
    """A model the device process serves, as the consumers see it (see ``device_server._Resident.card``)."""

    name: str
    kind: ModelKind
    queue: str
    #: ``texts`` (tokenised here), ``features`` (float vectors) or ``prompt`` (generation, tokenised there).
    input_kind: str
    labels: list[str]
    dim: int | None
    features: int | None
    max_seq_len: int
    tokenizer: str | None
    #: Generate models: the most sequences the device's engine decodes at once (None otherwise).
    slots: int | None
    device: str
    dtype: str
    load: dict[str, Any]

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ModelCard:
        return cls(**{**raw, "kind": ModelKind(raw["kind"])})


class ModelRetired(DeviceLost):
    """The job's model left this worker group (unloaded, or its name switched away) after the job was
    received: the job is handed back to its queue, uncharged, for a worker that serves the model."""


@dataclass
class ConsumerRuntime:
    """State of one consumer process: the device's models, the hand-off, and the jobs in flight.

    ``cards``: model reference -> card; ``current``: model name -> the reference that takes jobs naming
    the name alone; ``retired``: references and names this group served and no longer does.
    """

    settings: WorkerSettings
    device: str
    cards: dict[str, ModelCard]
    client: DeviceClient
    current: dict[str, str] = field(default_factory=dict)
    retired: frozenset[str] = frozenset()
    started_at: float = field(default_factory=time.time)
    in_flight_ids: set[str] = field(default_factory=set)
    jobs_done: int = 0
    last_job_at: float | None = None
    #: Called with (jobs in flight, jobs done) whenever they change (the status board's counts).
    on_counts: Callable[[int, int], None] | None = None
    _encoders: dict[str, TextEncoder] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self._encoders.update(self.new_encoders(self.cards.values()))

    @classmethod
    def from_plan(cls, plan: ServingPlan, **fields: Any) -> ConsumerRuntime:
        """The runtime of a consumer starting with ``plan``."""
        return cls(cards={ref: ModelCard.from_dict(card) for ref, card in plan.cards.items()},
                   current=dict(plan.current), **fields)

    def new_encoders(self, cards: Any) -> dict[str, TextEncoder]:
        """Tokenisers for those of ``cards`` that take texts and have none yet (reads tokenizer files: call
        it off the event loop)."""
        return {card.name: TextEncoder(card.tokenizer, card.max_seq_len) for card in cards
                if card.input_kind == "texts" and card.tokenizer and card.name not in self._encoders}

    def adopt(self, plan: ServingPlan, encoders: dict[str, TextEncoder]) -> None:
        """Serve as ``plan`` says from now on (``encoders``: from ``new_encoders`` for its new cards). Each
        mapping is replaced whole, so a task thread reads either the old one or the new one."""
        cards = {ref: self.cards.get(ref) or ModelCard.from_dict(card) for ref, card in plan.cards.items()}
        served_before = set(self.cards) | set(self.current)
        self._encoders = {**{ref: enc for ref, enc in self._encoders.items() if ref in cards}, **encoders}
        self.retired = frozenset((self.retired | served_before) - set(cards) - set(plan.current))
        self.current = dict(plan.current)
        self.cards = cards

    def model(self, name: str, kind: ModelKind) -> ModelCard:
        """The card of model ``name`` (a reference, or a name: its current reference) or fail the job with
        ``unknown_model`` / ``wrong_model_kind``; raise ``ModelRetired`` (hand the job back) for a model
        this group stopped serving after the job reached it."""
        card = self.cards.get(self.current.get(name, name)) or self._retiring_version(name)
        if card is None:
            if name in self.retired:
                raise ModelRetired(f"model {name!r} left this worker; the job goes back to its queue")
            raise JobFailedError(ErrorCode.UNKNOWN_MODEL.value, f"this worker does not serve model {name!r}",
                                 {"served": sorted({*self.cards, *self.current})})
        if card.kind is not kind:
            raise JobFailedError(ErrorCode.WRONG_MODEL_KIND.value,
                                 f"model {name!r} serves {card.kind.value!r} jobs, not {kind.value!r}")
        return card

    def _retiring_version(self, name: str) -> ModelCard | None:
        """For a name with no current reference: its last version still resident (being unloaded), which
        finishes the jobs it received before."""
        versions = [card for ref, card in self.cards.items() if ref.partition("@")[0] == name]
        return versions[-1] if versions else None

    def encoder(self, card: ModelCard) -> TextEncoder:
        encoder = self._encoders.get(card.name)
        if encoder is None:
            raise JobFailedError(ErrorCode.INVALID_INPUT.value, f"model {card.name!r} takes no texts")
        return encoder

    @property
    def in_flight(self) -> int:
        return len(self.in_flight_ids)

    def job_started(self, job_id: str) -> None:
        with self._lock:
            self.in_flight_ids.add(job_id)
            self._report()

    def job_finished(self, job_id: str) -> None:
        with self._lock:
            self.in_flight_ids.discard(job_id)
            self.jobs_done += 1
            self.last_job_at = time.time()
            self._report()

    def _report(self) -> None:
        if self.on_counts is not None:
            self.on_counts(len(self.in_flight_ids), self.jobs_done)


_current: ConsumerRuntime | None = None


def install(runtime: ConsumerRuntime) -> None:
    """Make ``runtime`` the one that tasks in this process use."""
    global _current
    _current = runtime


def current() -> ConsumerRuntime:
    """The installed runtime; a task running without one is a deployment error."""
    if _current is None:
        raise JobFailedError(ErrorCode.INTERNAL.value,
                             "worker runtime not initialised (start workers with `fleet worker`)")
    return _current
