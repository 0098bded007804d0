"""The model catalog as the client sees it: which models exist, and which a live worker serves. No I/O.

Two sources, both written by workers (workers/process/health.py):

* ``fleet:catalog`` (hash): model name -> JSON ``{"kind", "queue", "last_seen"}``: every model a
  worker ever served, ``last_seen`` being the UNIX time of the last heartbeat that announced it.
  A model missing here is unknown (``UnknownModelError``).
* the live heartbeats (``fleet:heartbeat:<worker>``, JSON with ``models``; each expires a few
  heartbeat intervals after its worker stops beating): a model that no live heartbeat lists has
  no worker now. A job for it is refused (``ModelUnavailableError``) unless the caller opts in to
  wait for a worker (scale from zero).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace

from producer.contract import ModelKind, inference_queue
from producer.errors import InvalidRequestError, ModelUnavailableError, UnknownModelError, WrongModelKindError


@dataclass(frozen=True)
class CatalogEntry:
    """One model of the catalog. ``last_seen``: UNIX time (s) a worker last announced it, if known;
    ``live``: a live worker serves it now."""

    kind: str
    queue: str
    last_seen: float | None = None
    live: bool = False


def parse_catalog(raw: Mapping[bytes | str, bytes | str]) -> dict[str, CatalogEntry]:
    """The ``fleet:catalog`` hash as entries; malformed entries are left out."""
    entries = {}
    for name, value in raw.items():
        try:
            body = json.loads(value)
            entries[name.decode() if isinstance(name, bytes) else name] = CatalogEntry(
                str(body["kind"]), str(body["queue"]), _time_or_none(body.get("last_seen")))
        except (ValueError, TypeError, KeyError):
            continue
    return entries


def live_models(heartbeats: Iterable[bytes | str | None]) -> set[str]:
    """Every model some live heartbeat lists (a missing heartbeat, None, is a worker gone)."""
    models: set[str] = set()
    for body in heartbeats:
        if body is None:
            continue
        try:
            listed = json.loads(body).get("models", [])
        except (ValueError, AttributeError):
            continue
        models.update(name for name in listed if isinstance(name, str))
    return models


class Catalog:
    """The client's cached view of the catalog and of the live models, refreshed every ``cache_s`` seconds."""

    def __init__(self, cache_s: float):
        self.cache_s = cache_s
        self.entries: dict[str, CatalogEntry] = {}
        self.live: set[str] = set()
        self._loaded_at = -math.inf

    def stale(self, now: float) -> bool:
        """True when the view is older than ``cache_s`` (``now``: monotonic seconds)."""
        return now - self._loaded_at > self.cache_s

    def load(self, entries: dict[str, CatalogEntry], live: set[str], now: float) -> None:
        self.entries, self.live, self._loaded_at = entries, live, now

    def refuse_taken_name(self, name: str, trained: bool) -> None:
        """Refuse ``register_as=name`` when the fleet already has a model of that name (``trained``: one
        registered by an earlier training job): the new model would never be served under it."""
        if name in self.entries or trained:
            raise InvalidRequestError(f"register_as {name!r}: the fleet already has a model of that name; "
                                      "choose another", [{"loc": ["register_as"], "msg": "name taken",
                                                          "type": "value_error"}])

    def view(self) -> dict[str, CatalogEntry]:
        """Every model, with ``live`` set."""
        return {name: replace(entry, live=name in self.live) for name, entry in sorted(self.entries.items())}

    def resolve(self, kind: ModelKind, model: str, *, wait_for_worker: bool, wall_now: float) -> str:
        """The queue of ``model`` for jobs of ``kind``.

        Raises ``UnknownModelError``, ``WrongModelKindError`` or, unless ``wait_for_worker``,
        ``ModelUnavailableError`` (``wall_now``: UNIX time, for the message).
        """
        entry = self.entries.get(model)
        if entry is None:
            known = ", ".join(sorted(self.entries)) or "none"
            raise UnknownModelError(f"unknown model {model!r}; the fleet serves: {known}",
                                    [{"loc": ["model"], "msg": "not in the catalog", "type": "unknown_model"}])
        if entry.kind != kind.value:
            raise WrongModelKindError(f"model {model!r} serves {entry.kind!r} jobs, not {kind.value!r}",
                                      [{"loc": ["model"], "msg": f"serves {entry.kind} jobs",
                                        "type": "wrong_model_kind"}])
        if not wait_for_worker and model not in self.live:
            raise ModelUnavailableError(model, entry.last_seen, wall_now)
        try:
            return inference_queue(kind, model)
        except ValueError as exc:  # a catalog entry no worker could have written
            raise InvalidRequestError(str(exc)) from None


def _time_or_none(value: object) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None
