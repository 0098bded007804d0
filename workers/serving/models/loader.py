"""Load a registry entry into a resident model of the right kind, with a load report."""

from __future__ import annotations

import logging
import time

import torch

from producer.contract import ModelKind
from workers.serving.models.base import memory_snapshot
from workers.serving.models.report import LoadReport
from workers.serving.registry import ModelSpec

log = logging.getLogger(__name__)


def _implementation(spec: ModelSpec):
    """The resident-model class for ``spec``: by kind, and for classifiers by what the directory holds."""
    if spec.kind is ModelKind.EMBED:
        from workers.serving.models.embedder import Embedder

        return Embedder
    if spec.kind is ModelKind.GENERATE:
        from workers.serving.models.generator import Generator

        return Generator
    from workers.serving.models.classifier import TextClassifier
    from workers.serving.models.feature_classifier import FeatureClassifier, is_feature_classifier

    return FeatureClassifier if is_feature_classifier(spec) else TextClassifier


def load_model(spec: ModelSpec, device: str):
    """Load ``spec`` onto ``device``, warm it up, and return ``(model, LoadReport)``.

    Raises whatever loading raised; the caller stops the worker rather than serve half the models.
    """
    started = time.perf_counter()
    model = _implementation(spec)(spec, device)
    loaded = time.perf_counter()
    model.warmup()
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)
    warmed = time.perf_counter()
    parameters = sum(p.numel() for p in model.model.parameters())
    report = LoadReport(model=spec.name, kind=spec.kind.value, device=device,
                        dtype=str(model.dtype).removeprefix("torch."), load_s=loaded - started,
                        warmup_s=warmed - loaded, parameters=parameters, **memory_snapshot(device))
    log.info("loaded model %s (%s) on %s in %.2f s, warm-up %.2f s, %d parameters, rss %.0f MiB",
             spec.name, spec.kind.value, device, report.load_s, report.warmup_s, parameters,
             report.rss_bytes / 2**20)
    return model, report
