"""Serving the digits classifiers that Fleet trains (MLP, ResNet-style CNN) on feature vectors.

A directory written by ``workers.training.models.save_classifier`` (``classifier.json`` +
safetensors) is served through ``classify`` jobs with ``inputs``: each input is the flat
vector of one sample (64 pixel intensities in [0, 1] for the 8x8 digits).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from producer.contract import ErrorCode
from producer.errors import JobFailedError
from workers.serving.registry import ModelSpec
from workers.training.models import CLASSIFIER_CONFIG, load_classifier


def is_feature_classifier(spec: ModelSpec) -> bool:
    """True if the spec's directory holds a Fleet-trained classifier rather than a transformers one."""
    scheme = spec.source.partition(":")[0]
    return scheme == "dir" and (Path(spec.source[4:]) / CLASSIFIER_CONFIG).is_file()


def check_feature_lengths(model: str, features: int, inputs: list[list[float]]) -> list[list[float]]:
    """Refuse (``invalid_input``) vectors whose length is not ``features``; return them unchanged."""
    wrong = [i for i, vector in enumerate(inputs) if len(vector) != features]
    if wrong:
        raise JobFailedError(ErrorCode.INVALID_INPUT.value, f"model {model!r} takes {features} features per input",
                             {"inputs_with_wrong_length": wrong[:20]})
    return inputs


class FeatureClassifier:
    """A resident MLP/CNN classifier; ``run_batch`` is called only by its batcher's device thread."""

    kind = "classify"
    input_kind = "features"

    def __init__(self, spec: ModelSpec, device: str):
        self.spec = spec
        self.device = device
        self.dtype = torch.float32
        directory = Path(spec.source[4:])
        self.config = json.loads((directory / CLASSIFIER_CONFIG).read_text())
        self.model, self.labels = load_classifier(directory, device)
        self.input_shape = tuple(self.config["input_shape"])
        self.features = math.prod(self.input_shape)

    def check_features(self, inputs: list[list[float]]) -> list[list[float]]:
        """Refuse (``invalid_input``) vectors of the wrong length; return them unchanged."""
        return check_feature_lengths(self.spec.name, self.features, inputs)

    @torch.inference_mode()
    def run_batch(self, vectors: list[list[float]], info: object = None) -> list[torch.Tensor]:
        """One probability vector (float32, CPU) per input vector."""
        batch = torch.tensor(vectors, dtype=torch.float32, device=self.device).reshape(-1, *self.input_shape)
        return list(torch.softmax(self.model(batch).float(), dim=-1).cpu().unbind(0))

    def warmup(self) -> None:
        self.run_batch([[0.0] * self.features])
