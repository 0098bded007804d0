"""``GenerationEngine``: continuous batching of generate jobs for one causal LM on one device.

One decode thread owns the model. Every step it (1) ends the sequences that were cancelled,
expired while waiting, or are handed back at close; (2) admits waiting sequences, by priority
then arrival, while the limits allow (``EngineLimits``: sequences, KV-cache positions, prefill
tokens per step) and prefills them together, choosing and streaming each one's first token at
once; (3) decodes one token for every running sequence in one forward pass. A sequence leaves
the batch the step it ends, and its cache rows go with it (``PaddedKV``).

Each sequence keeps its own decoding choices (``Sampling``: greedy or temperature/top-p from its
own seeded generator, stop strings, ``max_new_tokens``) and its own ``TextStream``, whose pieces
go to its ``on_piece`` as they become final; ``on_done`` gets its ``Outcome`` exactly once.
Callbacks run on the decode thread (or the thread calling ``close``) and must return quickly.

Why not transformers' own ``ContinuousBatchingManager``: see docs/ARCHITECTURE.md
("Generation"): it samples every request from the one global torch generator, has one
``do_sample`` for all requests, and no stop strings.
"""

from __future__ import annotations

import heapq
import inspect
import itertools
import threading
import time
import uuid
from collections.abc import Callable, Collection
from typing import Any

import torch

from workers.serving.generation import kv_batch
from workers.serving.generation.hooks import EngineHooks, EngineStats, StepReport, call_hook
from workers.serving.generation.kv_batch import PaddedKV
from workers.serving.generation.limits import EngineLimits, fit_prompt
from workers.serving.generation.sampling import Sampling, next_tokens
from workers.serving.generation.sequence import Finish, Outcome, Sequence, SequenceHandle
from workers.serving.generation.text_stream import TextStream


class EngineClosed(RuntimeError):
    """``submit`` after ``close``: the engine takes no more sequences."""


Ended = list[tuple[Sequence, Finish]]
#: ``submit``'s default: greedy, 64 new tokens, no stop strings.
DEFAULT_SAMPLING = Sampling()


class GenerationEngine:
    """Continuous batching for ``model`` (a transformers causal LM, already on its device, in eval
    mode) with ``tokenizer``. ``eos_token_ids``: tokens that end a sequence (default: the
    tokenizer's and the model's generation config's). Thread-safe; see the module docstring."""

    def __init__(self, model, tokenizer, limits: EngineLimits, *, name: str = "model",
                 hooks: EngineHooks | None = None, eos_token_ids: Collection[int] | None = None):
        kv_batch.check_supported(model.config)
        positions = getattr(model.config, "max_position_embeddings", None)
        if positions and limits.max_seq_len > positions:
            raise ValueError(f"max_seq_len {limits.max_seq_len} exceeds the model's max_position_embeddings "
                             f"{positions}")
        self.name = name
        self.model = model
        self.tokenizer = tokenizer
        self.limits = limits
        self.device = model.device
        self.dtype = model.dtype
        self._eos = frozenset(_eos_ids(model, tokenizer) if eos_token_ids is None else eos_token_ids)
        self._pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(self._eos, default=0)
        bos = tokenizer.bos_token_id
        self._leading_special = int(bos is not None and tokenizer("x")["input_ids"][:1] == [bos])
        parameters = inspect.signature(model.forward).parameters
        # transformers >= 5.2x renamed the KV-cache argument ``past_key_values`` to ``cache``.
        self._cache_arg = "cache" if "cache" in parameters else "past_key_values"
        self._logits_to_keep = {"logits_to_keep": 1} if "logits_to_keep" in parameters else {}
        self._hooks = hooks or EngineHooks()
        self._stats = EngineStats()
        self._cond = threading.Condition()
        self._order = itertools.count()
        self._waiting: list[tuple[int, int, Sequence]] = []  # heap: (priority, arrival, sequence)
        self._jobs: dict[str, Sequence] = {}  # every sequence not ended yet, waiting or running
        self._running: list[Sequence] = []  # the rows of ``_kv``, in order
        self._kv: PaddedKV | None = None
        self._kv_positions = self._kv_bytes = 0
        self._closing = self._stopping = False
        self._handed_back: list[str] = []
        self._thread = threading.Thread(target=self._loop, name=f"generate-{name}", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ API (any thread)

    def prompt_ids(self, prompt: str, max_new_tokens: int, truncate: bool = False) -> list[int]:
        """The prompt's token ids as the engine will run them; ``PromptTooLong`` if they do not fit
        (with ``truncate``, the start of the prompt is dropped instead: see ``fit_prompt``)."""
        ids = self.tokenizer(prompt, add_special_tokens=True)["input_ids"]
        return fit_prompt(ids, self.limits, max_new_tokens, truncate, self._leading_special)

    def submit(self, job_id: str, prompt: str, sampling: Sampling = DEFAULT_SAMPLING, *,
               on_piece: Callable[[str], None] | None = None, on_done: Callable[[Outcome], None] | None = None,
               deadline: float | None = None, priority: int = 0, truncate: bool = False) -> SequenceHandle:
        """Queue a sequence; return at once. It waits for a slot behind sequences of lower
        ``priority`` (then earlier ones), and ends as ``EXPIRED`` if ``deadline`` (UNIX time) passes
        first. Raises ``PromptTooLong``, ``EngineClosed``, or ``ValueError`` for a job id in use."""
        ids = self.prompt_ids(prompt, sampling.max_new_tokens, truncate)
        sequence = Sequence(job_id=job_id, prompt_ids=ids, sampling=sampling,
                            text=TextStream(self._detokenize, sampling.stop), generator=sampling.generator(self.device),
                            eos_ids=self._eos, on_piece=on_piece, on_done=on_done, deadline=deadline,
                            priority=priority, handle=SequenceHandle(job_id))
        with self._cond:
            if self._closing:
                raise EngineClosed(f"generation engine {self.name} is closed")
            if job_id in self._jobs:
                raise ValueError(f"job {job_id} is already in generation engine {self.name}")
            self._jobs[job_id] = sequence
            heapq.heappush(self._waiting, (priority, next(self._order), sequence))
            self._cond.notify_all()
        return sequence.handle

    def cancel(self, job_id: str) -> bool:
        """End the sequence as ``CANCELLED``: at once if it waits, at the next step if it runs
        (its slot and cache rows are freed then). False if the engine does not hold it."""
        with self._cond:
            sequence = self._jobs.get(job_id)
            if sequence is None:
                return False
            sequence.cancelled = True
            self._cond.notify_all()
        return True

    def attach_hooks(self, hooks: EngineHooks) -> None:
        """Use ``hooks`` from the next step on (the process that owns the engine sets its own)."""
        self._hooks = hooks

    def free_slots(self) -> int:
        """How many more sequences the engine can take now without any of them waiting."""
        with self._cond:
            return max(0, self.limits.max_sequences - len(self._jobs))

    def stats(self) -> dict[str, Any]:
        """Gauges now (sequences running and waiting, KV-cache positions and bytes) plus
        ``EngineStats.snapshot()`` (tokens/s, TTFT and inter-token latency percentiles)."""
        with self._cond:
            gauges = {"model": self.name, "device": str(self.device), "sequences_running": len(self._running),
                      "sequences_waiting": len(self._jobs) - len(self._running),
                      "max_sequences": self.limits.max_sequences, "kv_positions": self._kv_positions,
                      "kv_positions_budget": self.limits.kv_cache_tokens, "kv_bytes": self._kv_bytes}
        return {**gauges, **self._stats.snapshot()}

    def warmup(self) -> None:
        """Run one short sequence through prefill and decode (first-call costs); raise if it fails."""
        outcome = self.submit(f"warmup-{uuid.uuid4()}", "warm up", Sampling(max_new_tokens=2)).wait()
        if outcome.finish is Finish.FAILED:
            assert outcome.error is not None  # FAILED always carries the exception (Finish.FAILED)
            raise outcome.error

    def close(self, drain_s: float = 0.0) -> list[str]:
        """Take no more sequences; hand back the waiting ones at once; let the running ones finish
        within ``drain_s`` seconds, then hand back the rest. Return the ids handed back
        (``Finish.HANDED_BACK``: the caller may run them elsewhere). Idempotent."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
            until = time.monotonic() + drain_s
            while self._jobs and (left := until - time.monotonic()) > 0:
                self._cond.wait(left)
            self._stopping = True
            self._cond.notify_all()
        self._thread.join()
        return list(self._handed_back)

    # ------------------------------------------------------------------ decode thread

    def _loop(self) -> None:
        with torch.inference_mode():
            while True:
                ended, joiners, stopping = self._plan()
                self._leave(ended)
                if stopping:
                    self._kv = None
                    return
                if joiners:
                    self._prefill(joiners)
                if self._running:
                    self._decode()

    def _plan(self) -> tuple[Ended, list[Sequence], bool]:
        """Wait until there is work; return the sequences to end now, those to admit, and whether to stop."""
        with self._cond:
            while True:
                ended: Ended = [(s, Finish.CANCELLED) for s in self._running if s.cancelled]
                if self._stopping:
                    ended += [(s, Finish.HANDED_BACK) for s in self._running if not s.cancelled]
                ended += self._end_waiting(time.time())
                joiners = [] if self._closing else self._admit()
                if ended or joiners or self._running or self._stopping:
                    return ended, joiners, self._stopping
                deadlines = [s.deadline for _, _, s in self._waiting if s.deadline is not None]
                self._cond.wait(max(0.0, min(deadlines) - time.time()) if deadlines else None)

    def _end_waiting(self, now: float) -> Ended:
        """Take out of the queue the waiting sequences that were cancelled, expired, or are handed back."""
        ended: Ended = []
        staying = []
        for entry in self._waiting:
            sequence = entry[2]
            if sequence.cancelled:
                ended.append((sequence, Finish.CANCELLED))
            elif self._closing:
                ended.append((sequence, Finish.HANDED_BACK))
            elif sequence.deadline is not None and sequence.deadline <= now:
                ended.append((sequence, Finish.EXPIRED))
            else:
                staying.append(entry)
        if ended:
            self._waiting = staying
            heapq.heapify(self._waiting)
        return ended

    def _admit(self) -> list[Sequence]:
        """Pop waiting sequences in order while the batch, each sequence at its longest, fits the limits."""
        limits = self.limits
        joiners: list[Sequence] = []
        longest = max((s.reserved_positions for s in self._running), default=0)
        prompt_width = 0
        while self._waiting:
            candidate = self._waiting[0][2]
            rows = len(self._running) + len(joiners) + 1
            longest_with = max(longest, candidate.reserved_positions)
            width_with = max(prompt_width, len(candidate.prompt_ids))
            if rows > limits.max_sequences or rows * longest_with > limits.kv_cache_tokens:
                break
            if joiners and (len(joiners) + 1) * width_with > limits.prefill_tokens_per_step:
                break
            heapq.heappop(self._waiting)
            joiners.append(candidate)
            longest, prompt_width = longest_with, width_with
        return joiners

    def _prefill(self, joiners: list[Sequence]) -> None:
        """One forward pass over the joiners' left-padded prompts; their first tokens; join the batch."""
        started = time.monotonic()
        for sequence in joiners:
            sequence.started_at = started
        width = max(len(s.prompt_ids) for s in joiners)
        ids = torch.full((len(joiners), width), self._pad_id, dtype=torch.long)
        mask = torch.zeros((len(joiners), width), dtype=torch.long)
        for row, sequence in enumerate(joiners):
            ids[row, width - len(sequence.prompt_ids):] = torch.tensor(sequence.prompt_ids)
            mask[row, width - len(sequence.prompt_ids):] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        cache = kv_batch.new_cache(self.model.config)
        try:
            logits = self._forward(ids, mask, (mask.cumsum(-1) - 1).clamp(min=0), cache, **self._logits_to_keep)
            tokens = next_tokens(logits, [s.sampling for s in joiners], [s.generator for s in joiners])
        except Exception as exc:  # noqa: BLE001 - the model failed these sequences only
            self._leave([(s, Finish.FAILED) for s in joiners], exc)
            return
        ended = self._accept(joiners, tokens, time.monotonic())
        leaving = {id(sequence) for sequence, _ in ended}
        staying = [row for row, sequence in enumerate(joiners) if id(sequence) not in leaving]
        if staying:
            joining = PaddedKV(cache, mask)
            if len(staying) < len(joiners):
                joining.keep(staying)
            with self._cond:
                if self._kv is None:
                    self._kv = joining
                else:
                    self._kv.extend(joining)
                self._running.extend(joiners[row] for row in staying)
        self._leave(ended)
        self._report("prefill", joiners, len(joiners), started, [])

    def _decode(self) -> None:
        """One token for every running sequence."""
        started = time.monotonic()
        rows = list(self._running)
        kv = self._kv
        assert kv is not None  # it holds the running rows, and this runs only while some run
        ids = torch.tensor([[s.tokens[-1]] for s in rows], device=self.device)
        positions = torch.tensor([[s.next_position] for s in rows], device=self.device)
        try:
            logits = self._forward(ids, kv.next_step_mask(), positions, kv.cache)
            tokens = next_tokens(logits, [s.sampling for s in rows], [s.generator for s in rows])
        except Exception as exc:  # noqa: BLE001 - the batch failed: end its sequences, keep serving
            self._leave([(s, Finish.FAILED) for s in rows], exc)
            return
        previous = [s.last_token_at for s in rows]  # set in every running row: prefill gave each its first token
        now = time.monotonic()
        self._leave(self._accept(rows, tokens, now))
        self._report("decode", rows, len(rows), started, [now - at for at in previous if at is not None])

    def _forward(self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache, **extra) -> torch.Tensor:
        output = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                            **{self._cache_arg: cache}, **extra)
        return output.logits[:, -1, :]

    def _accept(self, rows: list[Sequence], tokens: list[int], now: float) -> Ended:
        """Give each row its token (streaming its final text); return the rows that ended."""
        ended: Ended = []
        for sequence, token in zip(rows, tokens):
            first = sequence.first_token_at is None
            finish = sequence.accept(token, now)
            if first:
                ttft_s = now - sequence.submitted_at
                self._stats.record_first_token(ttft_s)
                call_hook(self._hooks.on_first_token, self.name, sequence.job_id, ttft_s)
            if finish is not None:
                ended.append((sequence, finish))
        return ended

    def _leave(self, ended: Ended, error: BaseException | None = None) -> None:
        """End these sequences: out of the queue, the batch and its cache; then tell their callers."""
        if not ended:
            return
        leaving = {id(sequence) for sequence, _ in ended}
        with self._cond:
            if any(id(s) in leaving for s in self._running):
                staying = [row for row, s in enumerate(self._running) if id(s) not in leaving]
                self._running = [self._running[row] for row in staying]
                if staying:
                    assert self._kv is not None  # it holds the running rows
                    self._kv.keep(staying)
                else:
                    self._kv = None
                self._update_kv_gauges()
            for sequence, finish in ended:
                self._jobs.pop(sequence.job_id, None)
                if finish is Finish.HANDED_BACK:
                    self._handed_back.append(sequence.job_id)
            self._cond.notify_all()
        for sequence, finish in ended:
            outcome = sequence.end(finish, error)
            self._stats.record_finish(outcome)
            call_hook(self._hooks.on_finish, self.name, outcome)
            sequence.handle._set(outcome)
            if sequence.on_done is not None:
                call_hook(sequence.on_done, outcome)

    def _report(self, kind: str, rows: list[Sequence], new_tokens: int, started: float,
                inter_token_s: list[float]) -> None:
        with self._cond:
            self._update_kv_gauges()
        step = StepReport(kind=kind, sequences=len(rows), new_tokens=new_tokens,
                          seconds=time.monotonic() - started, kv_positions=self._kv_positions,
                          kv_bytes=self._kv_bytes, job_ids=tuple(s.job_id for s in rows))
        self._stats.record_step(step, inter_token_s)
        call_hook(self._hooks.on_step, self.name, step)

    def _update_kv_gauges(self) -> None:
        self._kv_positions = self._kv.positions if self._kv is not None else 0
        self._kv_bytes = self._kv.nbytes() if self._kv is not None else 0

    def _detokenize(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)


def _eos_ids(model, tokenizer) -> set[int]:
    """End-of-sequence tokens: the tokenizer's plus the model's generation config's (an int or a list)."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if configured is not None:
        ids.update(configured if isinstance(configured, (list, tuple)) else [configured])
    return ids
