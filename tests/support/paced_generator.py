"""A test-only generate model (registry ``impl = "tests.support.paced_generator:paced_generator"``):
the registry's causal LM in a ``GenerationEngine`` whose every forward pass (prefill or decoding
step) first waits ``STEP_S`` seconds. A 512-token job then runs for about 10 s on any machine, so
tests that must act while a generation is under way (drain, cancel, a slot that frees) do not
race a tiny model that finishes in a fraction of a second."""

from __future__ import annotations

import time

from workers.serving.generation.engine import GenerationEngine
from workers.serving.models.generator import load_generator
from workers.serving.registry import ModelSpec

#: Seconds each forward pass waits before it runs.
STEP_S = 0.02


class PacedEngine(GenerationEngine):
    """``GenerationEngine`` that waits ``STEP_S`` seconds before each forward pass."""

    def _forward(self, *args, **kwargs):
        time.sleep(STEP_S)
        return super()._forward(*args, **kwargs)


def paced_generator(spec: ModelSpec, device: str) -> GenerationEngine:
    """``spec`` loaded as the loader would, in a ``PacedEngine``."""
    return load_generator(spec, device, engine_class=PacedEngine)
