"""What one generation engine may hold, and the rule for prompts that do not fit."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class EngineLimits:
    """Limits of one engine (one model on one device). Token counts are tokens of that model.

    ``max_sequences``: the most sequences decoding at once (the batch size of a decoding step).
    ``max_seq_len``: prompt plus new tokens of one sequence.
    ``max_prompt_tokens``: the longest prompt.
    ``kv_cache_tokens``: the KV-cache budget, in token positions of the padded batch
    (sequences x the longest sequence: what the cache really allocates); a sequence joins the
    batch only if the batch, with every sequence at its longest, still fits.
    ``prefill_tokens_per_step``: the most (padded) prompt tokens prefilled in one step, so that
    a burst of new sequences delays the running ones by a bounded amount; one sequence is
    always admitted.
    """

    max_sequences: int
    max_seq_len: int
    max_prompt_tokens: int
    kv_cache_tokens: int
    prefill_tokens_per_step: int = 4096

    def __post_init__(self) -> None:
        for name in ("max_sequences", "max_seq_len", "max_prompt_tokens", "kv_cache_tokens",
                     "prefill_tokens_per_step"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.max_prompt_tokens >= self.max_seq_len:
            raise ValueError(f"max_prompt_tokens ({self.max_prompt_tokens}) must be below max_seq_len "
                             f"({self.max_seq_len}): a sequence needs room for a new token")
        if self.kv_cache_tokens < self.max_seq_len:
            raise ValueError(f"kv_cache_tokens ({self.kv_cache_tokens}) is below max_seq_len ({self.max_seq_len}): "
                             "a sequence that fits max_seq_len could never run")

    def prompt_room(self, max_new_tokens: int) -> int:
        """The most prompt tokens a request for ``max_new_tokens`` may have (0 or less: none fits)."""
        return min(self.max_prompt_tokens, self.max_seq_len - max_new_tokens)


class PromptTooLong(ValueError):
    """The prompt has more tokens than fit: ``prompt_tokens`` > ``limit``, where ``limit`` is the
    smaller of the longest prompt and ``max_seq_len - max_new_tokens``."""

    def __init__(self, prompt_tokens: int, limit: int, max_seq_len: int, max_new_tokens: int):
        super().__init__(f"the prompt has {prompt_tokens} tokens; at most {max(limit, 0)} fit with "
                         f"max_new_tokens={max_new_tokens} (max_seq_len {max_seq_len}); shorten it, lower "
                         "max_new_tokens, or set truncate=True to drop the prompt's start")
        self.prompt_tokens, self.limit = prompt_tokens, max(limit, 0)
        self.max_seq_len, self.max_new_tokens = max_seq_len, max_new_tokens

    def details(self) -> dict[str, int]:
        return {"prompt_tokens": self.prompt_tokens, "max_prompt_tokens": self.limit,
                "max_seq_len": self.max_seq_len, "max_new_tokens": self.max_new_tokens}


def fit_prompt(ids: list[int], limits: EngineLimits, max_new_tokens: int, truncate: bool,
               leading_special: int = 0) -> list[int]:
    """Return ``ids`` if they fit ``limits`` for ``max_new_tokens``; else, with ``truncate``, their
    end (the start of the prompt is dropped, after the first ``leading_special`` tokens, e.g. BOS,
    which stay); else raise ``PromptTooLong``.
    """
    limit = limits.prompt_room(max_new_tokens)
    if len(ids) <= limit:
        return ids
    if not truncate or limit <= leading_special:
        raise PromptTooLong(len(ids), limit, limits.max_seq_len, max_new_tokens)
    return ids[:leading_special] + ids[len(ids) - (limit - leading_special):]
