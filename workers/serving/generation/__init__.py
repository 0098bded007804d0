"""Generation at scale: one continuous-batching decode loop per causal LM (``GenerationEngine``).

Everything in this package but ``job`` imports only torch, transformers and the standard
library (no Celery, Redis or pydantic), so the engine can run inside any process that owns
the device, and ``bench/generation.py`` can run it on a machine that has nothing else.
``job`` adapts the engine to a Fleet generate job (contract, streaming, cancellation).
"""
