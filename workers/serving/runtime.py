"""The per-process state of a consumer: what the device process serves and how to reach it.

Built once in each consumer process (workers/process/consumer_main.py) from the model cards
the device process reported, before the process consumes; tasks reach it through
``current()``. A consumer never imports torch: the models live in the device process, and
here each model is its card (kind, labels, dimension, tokenizer file) plus a ``TextEncoder``
for text models.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from producer.contract import ErrorCode, ModelKind
from producer.errors import JobFailedError
from workers.serving.device_client import DeviceClient
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


@dataclass
class ConsumerRuntime:
    """State of one consumer process: the device's models, the hand-off, and the jobs in flight."""

    settings: WorkerSettings
    device: str
    cards: dict[str, ModelCard]
    client: DeviceClient
    started_at: float = field(default_factory=time.time)
    in_flight_ids: set[str] = field(default_factory=set)
    jobs_done: int = 0
    last_job_at: float | None = None
    #: Called with (jobs in flight, jobs done) whenever they change (the status board's counts).
    on_counts: Callable[[int, int], None] | None = None
    _encoders: dict[str, TextEncoder] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        for card in self.cards.values():
            if card.input_kind == "texts" and card.tokenizer:
                self._encoders[card.name] = TextEncoder(card.tokenizer, card.max_seq_len)

    def model(self, name: str, kind: ModelKind) -> ModelCard:
        """The card of model ``name`` or fail the job with ``unknown_model`` / ``wrong_model_kind``."""
        card = self.cards.get(name)
        if card is None:
            raise JobFailedError(ErrorCode.UNKNOWN_MODEL.value, f"this worker does not serve model {name!r}",
                                 {"served": sorted(self.cards)})
        if card.kind is not kind:
            raise JobFailedError(ErrorCode.WRONG_MODEL_KIND.value,
                                 f"model {name!r} serves {card.kind.value!r} jobs, not {kind.value!r}")
        return card

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
