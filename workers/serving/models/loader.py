"""Load a registry entry into a resident model of the right kind, with a load report."""

from __future__ import annotations

import logging
import time

import torch

from producer.contract import ModelKind
from workers.serving.models.base import memory_snapshot
from workers.serving.models.report import LoadReport
from workers.serving.registry import Backend, ModelSpec

log = logging.getLogger(__name__)


def implementation_for(spec: ModelSpec):
    """What builds ``spec``'s resident model from ``(spec, device)``: the registry's own ``impl`` class if it
    names one; ONNX Runtime's for the onnxruntime backend; else the PyTorch class by kind, and for
    classifiers by what the directory holds."""
    if spec.impl is not None:
        from kombu.utils.imports import symbol_by_name

        return symbol_by_name(spec.impl)
    if spec.backend is Backend.ONNXRUNTIME:
        from workers.serving.models.onnx_models import open_onnx_model

        return open_onnx_model
    if spec.kind is ModelKind.EMBED:
        from workers.serving.models.embedder import Embedder

        return Embedder
    if spec.kind is ModelKind.GENERATE:
        from workers.serving.models.generator import load_generator

        return load_generator
    from workers.serving.models.classifier import TextClassifier
    from workers.serving.models.feature_classifier import FeatureClassifier, is_feature_classifier

    return FeatureClassifier if is_feature_classifier(spec) else TextClassifier


def load_model(spec: ModelSpec, device: str):
    """Load ``spec`` onto ``device``, warm it up, and return ``(model, LoadReport)``.

    Raises whatever loading raised. ``ModelRefused`` (``workers.serving.refusal``) means this
    model's files cannot be served and the worker serves its other models; anything else stops
    the worker rather than serve half the models.
    """
    started = time.perf_counter()
    model = implementation_for(spec)(spec, device)
    loaded = time.perf_counter()
    model.warmup()
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)
    warmed = time.perf_counter()
    onnx = spec.backend is Backend.ONNXRUNTIME
    parameters = model.parameter_count if onnx else sum(p.numel() for p in model.model.parameters())
    report = LoadReport(model=spec.name, kind=spec.kind.value, device=model.device,
                        dtype=str(model.dtype).removeprefix("torch."), load_s=loaded - started,
                        warmup_s=warmed - loaded, parameters=parameters, **memory_snapshot(device),
                        extra={"backend": spec.backend.value, **({"providers": model.providers} if onnx else {})})
    log.info("loaded model %s (%s, %s) on %s in %.2f s, warm-up %.2f s, %d parameters, rss %.0f MiB",
             spec.name, spec.kind.value, spec.backend.value, model.device, report.load_s, report.warmup_s,
             parameters, report.rss_bytes / 2**20)
    return model, report
