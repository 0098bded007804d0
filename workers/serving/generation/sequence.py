"""One submitted sequence: its request, its state in the engine, and how it ended (``Outcome``)."""

from __future__ import annotations

import enum
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import overload

import torch

from workers.serving.generation.sampling import Sampling
from workers.serving.generation.text_stream import TextStream

log = logging.getLogger(__name__)


class Finish(str, enum.Enum):
    """Why a sequence ended. The first three are normal ends with a result."""

    LENGTH = "length"  # max_new_tokens generated
    STOP = "stop"  # a stop string appeared (the text ends before it)
    EOS = "eos"  # the model produced an end-of-sequence token
    CANCELLED = "cancelled"  # ``engine.cancel``: waiting, or running (its slot freed at the next step)
    EXPIRED = "expired"  # its deadline passed while it waited for a slot
    HANDED_BACK = "handed_back"  # the engine closed before it finished; the caller may run it elsewhere
    FAILED = "failed"  # the model raised while computing its batch (``Outcome.error``)

    @property
    def completed(self) -> bool:
        return self in (Finish.LENGTH, Finish.STOP, Finish.EOS)


@dataclass(frozen=True)
class Outcome:
    """How a sequence ended. Times are seconds; ``ttft_s`` is from ``submit`` to its first token
    (None if it got none), ``queued_s`` from ``submit`` to its prefill, ``decode_s`` from its first
    token to its end. ``text`` is the concatenation of every piece it streamed."""

    job_id: str
    finish: Finish
    text: str
    tokens_generated: int
    prompt_tokens: int
    queued_s: float | None
    ttft_s: float | None
    decode_s: float | None
    error: BaseException | None = None

    @property
    def tokens_per_s(self) -> float | None:
        """This sequence's own decoding rate after its first token."""
        if not self.decode_s or self.tokens_generated < 2:
            return None
        return (self.tokens_generated - 1) / self.decode_s


class SequenceHandle:
    """What ``GenerationEngine.submit`` returns: the job id and a way to wait for its ``Outcome``."""

    def __init__(self, job_id: str):
        self.job_id = job_id
        self._done = threading.Event()
        self._outcome: Outcome | None = None

    @overload
    def wait(self, timeout: None = None) -> Outcome: ...

    @overload
    def wait(self, timeout: float) -> Outcome | None: ...

    def wait(self, timeout: float | None = None) -> Outcome | None:
        """The outcome once the sequence ended, or None if ``timeout`` seconds passed first."""
        self._done.wait(timeout)
        return self._outcome

    def _set(self, outcome: Outcome) -> None:
        self._outcome = outcome
        self._done.set()


@dataclass(eq=False)
class Sequence:
    """Engine-internal state of one sequence (the decode thread owns everything but ``cancelled``)."""

    job_id: str
    prompt_ids: list[int]
    sampling: Sampling
    text: TextStream
    generator: torch.Generator | None
    eos_ids: frozenset[int]
    on_piece: Callable[[str], None] | None
    on_done: Callable[[Outcome], None] | None
    deadline: float | None  # UNIX time after which it may no longer start
    priority: int  # lower runs first
    handle: SequenceHandle
    submitted_at: float = field(default_factory=time.monotonic)
    started_at: float | None = None
    first_token_at: float | None = None
    last_token_at: float | None = None
    tokens: list[int] = field(default_factory=list)
    cancelled: bool = False
    outcome: Outcome | None = None

    @property
    def reserved_positions(self) -> int:
        """The most cache positions this sequence can reach: prompt plus all its new tokens."""
        return len(self.prompt_ids) + self.sampling.max_new_tokens

    @property
    def next_position(self) -> int:
        """Position of the token the next decoding step feeds (its last generated token)."""
        return len(self.prompt_ids) + len(self.tokens) - 1

    def accept(self, token: int, now: float) -> Finish | None:
        """Take the token the model chose; stream what became final; return the finish if it ended."""
        if self.first_token_at is None:
            self.first_token_at = now
        self.last_token_at = now
        finish = None
        if token in self.eos_ids:
            finish = Finish.EOS
        else:
            self.tokens.append(token)
            self.text.add(token)
            if self.text.stopped:
                finish = Finish.STOP
            elif len(self.tokens) >= self.sampling.max_new_tokens:
                finish = Finish.LENGTH
        if finish is not None:
            self.text.end()
        self._stream(self.text.take_piece())
        return finish

    def end(self, finish: Finish, error: BaseException | None = None) -> Outcome:
        """Record how the sequence ended (first call wins) and return the outcome."""
        if self.outcome is None:
            decode_s = None
            if self.first_token_at is not None and self.last_token_at is not None:  # accept() sets both
                ended = self.last_token_at if finish.completed else time.monotonic()
                decode_s = ended - self.first_token_at
            self.outcome = Outcome(
                job_id=self.job_id, finish=finish, text=self.text.streamed,
                tokens_generated=len(self.tokens), prompt_tokens=len(self.prompt_ids),
                queued_s=None if self.started_at is None else self.started_at - self.submitted_at,
                ttft_s=None if self.first_token_at is None else self.first_token_at - self.submitted_at,
                decode_s=decode_s, error=error)
        return self.outcome

    def _stream(self, piece: str) -> None:
        if piece and self.on_piece is not None:
            try:
                self.on_piece(piece)
            except Exception:
                log.exception("on_piece of job %s raised; the piece is lost to that caller", self.job_id)
