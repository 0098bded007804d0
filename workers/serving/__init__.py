"""Serving: the model registry, resident models, the dynamic batcher, inference and the per-process runtime."""
