"""Per-sequence decoding choices: greedy, or temperature + nucleus (top-p) sampling from the
sequence's own ``torch.Generator``, so that a seeded job draws the same numbers whatever else
shares its batch."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class Sampling:
    """How one sequence is decoded.

    ``temperature`` 0 is greedy (argmax). Otherwise the next token is drawn from
    ``softmax(logits / temperature)`` restricted to the smallest set of most likely tokens whose
    probability reaches ``top_p``. ``seed`` seeds the sequence's own generator (None: a fresh
    random seed). ``stop``: generation ends before the first of these strings.
    """

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    @classmethod
    def of(cls, request: Any) -> Sampling:
        """The decoding choices of a ``GenerateRequest``."""
        return cls(max_new_tokens=request.max_new_tokens, temperature=float(request.temperature),
                   top_p=request.top_p, seed=request.seed, stop=tuple(request.stop))

    def generator(self, device: torch.device | str) -> torch.Generator | None:
        """The sequence's own random generator on ``device`` (None for greedy decoding)."""
        if self.temperature == 0:
            return None
        generator = torch.Generator(device=device)
        if self.seed is None:
            generator.seed()
        else:
            generator.manual_seed(self.seed)
        return generator


def next_tokens(logits: torch.Tensor, samplings: Sequence[Sampling],
                generators: Sequence[torch.Generator | None]) -> list[int]:
    """One token per row of ``logits`` (``[rows, vocab]``), row ``i`` decoded by ``samplings[i]``
    with ``generators[i]``. One device-to-host copy for the whole batch."""
    chosen = torch.argmax(logits, dim=-1)
    for row, (sampling, generator) in enumerate(zip(samplings, generators)):
        if sampling.temperature > 0:
            chosen[row] = _draw(logits[row], sampling, generator)
    return chosen.tolist()


def _draw(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None) -> torch.Tensor:
    probs = torch.softmax(logits.float() / sampling.temperature, dim=-1)
    if sampling.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        keep = torch.cumsum(sorted_probs, dim=-1) - sorted_probs < sampling.top_p
        probs = torch.zeros_like(probs).scatter(-1, order, torch.where(keep, sorted_probs, 0.0))
    return torch.multinomial(probs, 1, generator=generator)[0]
