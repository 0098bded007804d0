"""Numbers out of the engine: callbacks for metrics and spans (``EngineHooks``) and the rolling
aggregates behind ``GenerationEngine.stats()`` (``EngineStats``)."""

from __future__ import annotations

import collections
import logging
import math
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from workers.serving.generation.sequence import Outcome

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StepReport:
    """One forward pass of the engine. ``kind``: ``"prefill"`` (new sequences' prompts) or
    ``"decode"`` (one token for every running sequence). ``seconds`` includes choosing the tokens
    and streaming the pieces; ``kv_positions``/``kv_bytes``: the running batch's cache after it."""

    kind: str
    sequences: int
    new_tokens: int
    seconds: float
    kv_positions: int
    kv_bytes: int
    job_ids: tuple[str, ...]


class EngineHooks:
    """Override what you need. Called on the decode thread: return quickly; an exception is logged
    and ignored."""

    def on_step(self, model: str, step: StepReport) -> None:
        """After every prefill and decode step."""

    def on_first_token(self, model: str, job_id: str, ttft_s: float) -> None:
        """When a sequence gets its first token, ``ttft_s`` after it was submitted."""

    def on_finish(self, model: str, outcome: Outcome) -> None:
        """When a sequence ends, whatever the reason."""


def call_hook(hook, *args: Any) -> None:
    try:
        hook(*args)
    except Exception:
        log.exception("generation hook %s raised", getattr(hook, "__qualname__", hook))


class EngineStats:
    """Counters since start plus rolling windows (the last ``samples`` TTFT and inter-token
    latencies; tokens over the last ``rate_window_s`` seconds). Thread-safe."""

    def __init__(self, samples: int = 2048, rate_window_s: float = 10.0):
        self._lock = threading.Lock()
        self._rate_window_s = rate_window_s
        self._ttft: collections.deque[float] = collections.deque(maxlen=samples)
        self._itl: collections.deque[float] = collections.deque(maxlen=samples)
        self._recent_tokens: collections.deque[tuple[float, int]] = collections.deque()
        self.tokens_generated = 0
        self.steps = {"prefill": 0, "decode": 0}
        self.finished: collections.Counter[str] = collections.Counter()

    def record_step(self, step: StepReport, inter_token_s: Iterable[float]) -> None:
        now = time.monotonic()
        with self._lock:
            self.steps[step.kind] += 1
            self.tokens_generated += step.new_tokens
            self._itl.extend(inter_token_s)
            self._recent_tokens.append((now, step.new_tokens))
            while self._recent_tokens and self._recent_tokens[0][0] < now - self._rate_window_s:
                self._recent_tokens.popleft()

    def record_first_token(self, ttft_s: float) -> None:
        with self._lock:
            self._ttft.append(ttft_s)

    def record_finish(self, outcome: Outcome) -> None:
        with self._lock:
            self.finished[outcome.finish.value] += 1

    def snapshot(self) -> dict[str, Any]:
        """``tokens_per_s`` over the rate window; ``ttft_s``/``inter_token_s``: p50 and p99 of the
        recent samples (None before any)."""
        now = time.monotonic()
        with self._lock:
            recent = sum(tokens for at, tokens in self._recent_tokens if at >= now - self._rate_window_s)
            return {
                "tokens_generated": self.tokens_generated,
                "tokens_per_s": recent / self._rate_window_s,
                "steps": dict(self.steps),
                "finished": dict(self.finished),
                "ttft_s": percentiles(self._ttft),
                "inter_token_s": percentiles(self._itl),
            }


def percentiles(samples: Iterable[float]) -> dict[str, float] | None:
    """p50 and p99 (nearest rank) of ``samples``; None when there are none."""
    ordered = sorted(samples)
    if not ordered:
        return None

    def rank(q: float) -> float:
        return ordered[max(0, math.ceil(q * len(ordered)) - 1)]

    return {"p50": rank(0.50), "p99": rank(0.99), "count": len(ordered)}
