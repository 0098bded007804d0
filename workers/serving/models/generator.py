"""Text generation with a Llama-architecture causal LM, token by token with a KV cache.

Decoding is greedy when ``temperature == 0``, else temperature + nucleus (top-p) sampling
from a seeded generator, so the same request and seed give the same text on one device.
"""

from __future__ import annotations

import inspect
import threading
from collections.abc import Callable

import torch
from transformers import AutoTokenizer, LlamaForCausalLM

from producer.contract import GenerateRequest, GenerateResult
from workers.serving.models.base import compute_dtype
from workers.serving.registry import ModelSpec, resolve_source


class Generator:
    """A resident causal LM. One generation at a time per model (``lock``)."""

    kind = "generate"

    def __init__(self, spec: ModelSpec, device: str):
        self.spec = spec
        self.device = device
        self.dtype = compute_dtype(spec, device)
        location, revision = resolve_source(spec)
        self.tokenizer = AutoTokenizer.from_pretrained(location, revision=revision, trust_remote_code=False)
        self.model = LlamaForCausalLM.from_pretrained(
            location, revision=revision, trust_remote_code=False, dtype=self.dtype, attn_implementation="sdpa",
        ).to(device).eval()
        self.lock = threading.Lock()
        # transformers >= 5.2x renamed the KV-cache argument and output field to ``cache``.
        self._cache_name = "cache" if "cache" in inspect.signature(self.model.forward).parameters else "past_key_values"

    def warmup(self) -> None:
        self.generate(GenerateRequest(prompt="warm up", model=self.spec.name, max_new_tokens=2))

    def _prompt_ids(self, prompt: str, max_new_tokens: int) -> torch.Tensor:
        ids = self.tokenizer(prompt, add_special_tokens=True)["input_ids"]
        room = max(1, self.spec.max_seq_len - max_new_tokens)
        return torch.tensor([ids[-room:]], device=self.device)

    @staticmethod
    def _next_token(logits: torch.Tensor, request: GenerateRequest, rng: torch.Generator | None) -> int:
        if request.temperature == 0:
            return int(torch.argmax(logits).item())
        probs = torch.softmax(logits.float() / request.temperature, dim=-1)
        if request.top_p < 1.0:
            sorted_probs, order = torch.sort(probs, descending=True)
            keep = torch.cumsum(sorted_probs, dim=-1) - sorted_probs < request.top_p
            sorted_probs = torch.where(keep, sorted_probs, torch.zeros_like(sorted_probs))
            probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
        return int(torch.multinomial(probs, 1, generator=rng).item())

    @torch.inference_mode()
    def generate(self, request: GenerateRequest, on_piece: Callable[[str], None] | None = None,
                 should_stop: Callable[[], bool] | None = None) -> GenerateResult:
        """Generate a continuation; call ``on_piece`` with each new piece of decoded text.

        ``should_stop`` is polled between tokens (cancellation); stop strings end the text
        before the stop string.
        """
        with self.lock:
            rng = None
            if request.temperature > 0:
                rng = torch.Generator(device=self.device)
                rng.manual_seed(request.seed if request.seed is not None else torch.seed())
            input_ids = self._prompt_ids(request.prompt, request.max_new_tokens)
            past = None
            generated: list[int] = []
            text = ""
            emitted = ""  # the prefix of ``text`` already passed to on_piece
            finish = "length"
            eos = self.tokenizer.eos_token_id
            for _ in range(request.max_new_tokens):
                if should_stop is not None and should_stop():
                    finish = "cancelled"
                    break
                out = self.model(input_ids=input_ids, use_cache=True, **{self._cache_name: past})
                past = out.get(self._cache_name)
                token = self._next_token(out.logits[0, -1], request, rng)
                if token == eos:
                    finish = "eos"
                    break
                generated.append(token)
                input_ids = torch.tensor([[token]], device=self.device)
                text = self.tokenizer.decode(generated, skip_special_tokens=True)
                cut = _first_stop(text, request.stop)
                if cut is not None:
                    text, finish = text[:cut], "stop"
                if on_piece is not None:
                    emitted = _emit_new(text, emitted, on_piece, final=finish == "stop")
                if finish == "stop":
                    break
            if on_piece is not None:
                _emit_new(text, emitted, on_piece, final=True)
            return GenerateResult(model=self.spec.name, device=self.device, text=text,
                                  tokens_generated=len(generated), finish_reason=finish)


def _emit_new(text: str, emitted: str, on_piece: Callable[[str], None], final: bool) -> str:
    """Pass the not-yet-emitted tail of ``text`` to ``on_piece``; return the new emitted prefix.

    Until ``final``, a trailing partial UTF-8 character (decoded as U+FFFD) is held back.
    """
    visible = text if final else text.rstrip("\ufffd")
    if len(visible) > len(emitted) and visible.startswith(emitted):
        on_piece(visible[len(emitted):])
        return visible
    return emitted


def _first_stop(text: str, stops: list[str]) -> int | None:
    positions = [text.find(stop) for stop in stops if stop and stop in text]
    return min(positions) if positions else None
