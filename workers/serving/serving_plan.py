"""What a worker group serves: its serving plan, the one description its launcher, consumers and heartbeat share.

A plan lists the model cards of the models resident in the device process
(``device_server._Resident.card``, keyed by model reference), which of them the group
*consumes* (takes jobs for), and, per model name, the *current* reference: the one that takes
jobs naming the model without a version. From it follow the queues the consumers consume, the
models the heartbeat announces and the group's catalog entries.

Queues (docs/PROTOCOL.md, "Model versions"): a consumed model takes the jobs of its own queue,
``fleet.<kind>.<ref>`` (``fleet.classify.digits-mlp@2`` takes only jobs pinned to version 2), and
the current version of a name also takes the name's queue, ``fleet.<kind>.<name>``. A model
without a version is its name's current model, so its own queue is the name's queue.

A model resident but not consumed is loading (not yet announced) or retiring (its jobs in flight
finish; no new ones come). ``version`` grows by one with every change; the launcher sends each
plan to every consumer (workers/serving/plan_follower.py). Pure data: no torch, no Celery.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from producer.contract import inference_queue, split_model_ref


@dataclass(frozen=True)
class ServingPlan:
    """One version of a group's plan. ``cards``: model reference -> card (a JSON-ready dict with at least
    ``kind`` and ``queue``); ``consuming``: the references taking jobs; ``current``: name -> reference."""

    version: int = 0
    cards: Mapping[str, dict[str, Any]] = field(default_factory=dict)
    consuming: frozenset[str] = frozenset()
    current: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def serving(cls, cards: list[dict[str, Any]], current: Mapping[str, str] | None = None) -> ServingPlan:
        """Version 0: every card consumed; each name's current reference from ``current`` when it names a
        loaded one, else the last card of that name."""
        by_ref = {card["name"]: card for card in cards}
        chosen: dict[str, str] = {}
        for ref in by_ref:
            chosen[split_model_ref(ref)[0]] = ref
        for name, ref in (current or {}).items():
            if ref in by_ref and split_model_ref(ref)[0] == name:
                chosen[name] = ref
        return cls(0, by_ref, frozenset(by_ref), chosen)

    # --- changes ------------------------------------------------------------------------------

    def with_card(self, card: dict[str, Any]) -> ServingPlan:
        """The next plan: ``card`` resident, not consumed yet."""
        return replace(self, version=self.version + 1, cards={**self.cards, card["name"]: card})

    def consume(self, ref: str, *, make_current: bool) -> ServingPlan:
        """The next plan: ``ref`` takes its own queue's jobs and, with ``make_current`` (or when its name has
        no current reference), its name's."""
        name = split_model_ref(ref)[0]
        current = dict(self.current)
        if make_current or name not in current:
            current[name] = ref
        return replace(self, version=self.version + 1, consuming=self.consuming | {ref}, current=current)

    def retire(self, refs: set[str], successor: str | None = None) -> ServingPlan:
        """The next plan: ``refs`` take no new jobs; a name whose current reference retires passes to
        ``successor`` (a consumed reference of that name) or, without one, has no current reference."""
        current = {name: ref for name, ref in self.current.items() if ref not in refs}
        if successor is not None:
            current[split_model_ref(successor)[0]] = successor
        return replace(self, version=self.version + 1, consuming=self.consuming - refs, current=current)

    def without(self, refs: set[str]) -> ServingPlan:
        """The next plan: the cards of ``refs`` gone (their models unloaded)."""
        cards = {ref: card for ref, card in self.cards.items() if ref not in refs}
        return replace(self, version=self.version + 1, cards=cards, consuming=self.consuming - refs,
                       current={name: ref for name, ref in self.current.items() if ref not in refs})

    # --- what follows from it -------------------------------------------------------------------

    def versions_of(self, name: str) -> list[str]:
        """The resident references of model ``name`` (its versions, or the name itself), in load order."""
        return [ref for ref in self.cards if split_model_ref(ref)[0] == name]

    def queues(self) -> set[str]:
        """Every queue the group consumes."""
        own = {self.cards[ref]["queue"] for ref in self.consuming}
        names = {inference_queue(self.cards[ref]["kind"], name) for name, ref in self.current.items()}
        return own | names

    def queue_models(self) -> dict[str, str]:
        """Queue -> the model reference whose jobs it brings (a name's queue: its current reference)."""
        owners = {self.cards[ref]["queue"]: ref for ref in self.consuming}
        owners.update({inference_queue(self.cards[ref]["kind"], name): ref for name, ref in self.current.items()})
        return owners

    def announced(self) -> list[str]:
        """The models the heartbeat lists (what a client may send jobs for): every consumed reference and
        every name with a current reference."""
        return sorted(self.consuming | set(self.current))

    def catalog_entries(self) -> dict[str, dict[str, Any]]:
        """The group's ``fleet:catalog`` entries: one per consumed reference, one per name (the name's
        queue; for a versioned model ``current`` names the version that takes its jobs here)."""
        entries = {ref: {"kind": self.cards[ref]["kind"], "queue": self.cards[ref]["queue"]}
                   for ref in self.consuming}
        for name, ref in self.current.items():
            kind = self.cards[ref]["kind"]
            entries[name] = {"kind": kind, "queue": inference_queue(kind, name),
                             **({"current": ref} if ref != name else {})}
        return entries

    # --- the wire between launcher and consumers -----------------------------------------------

    def message(self) -> dict[str, Any]:
        """This plan as a picklable dict (sent to consumers over their pipe)."""
        return {"version": self.version, "cards": list(self.cards.values()), "consuming": sorted(self.consuming),
                "current": dict(self.current)}

    @classmethod
    def from_message(cls, message: Mapping[str, Any]) -> ServingPlan:
        return cls(int(message["version"]), {card["name"]: card for card in message["cards"]},
                   frozenset(message["consuming"]), dict(message["current"]))
