"""A resident causal LM: a registry entry loaded into a continuous-batching ``GenerationEngine``."""

from __future__ import annotations

from transformers import AutoModelForCausalLM, AutoTokenizer

from workers.serving.generation.engine import GenerationEngine
from workers.serving.models.base import compute_dtype
from workers.serving.registry import ModelSpec, resolve_source


def load_generator(spec: ModelSpec, device: str,
                   engine_class: type[GenerationEngine] = GenerationEngine) -> GenerationEngine:
    """Load ``spec`` (tokenizer and causal LM, ``from_pretrained``) onto ``device`` and start its
    engine (an ``engine_class``) with the registry's limits (``ModelSpec.engine_limits``)."""
    location, revision = resolve_source(spec)
    tokenizer = AutoTokenizer.from_pretrained(location, revision=revision, trust_remote_code=False)
    model = AutoModelForCausalLM.from_pretrained(
        location, revision=revision, trust_remote_code=False, dtype=compute_dtype(spec, device),
        attn_implementation="sdpa",
    ).to(device).eval()
    return engine_class(model, tokenizer, spec.engine_limits(), name=spec.name)
