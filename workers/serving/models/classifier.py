"""Sequence classification with an encoder plus a classification head.

Serves any transformers ``*ForSequenceClassification`` directory; labels come from the
model config's ``id2label``. Scores are softmax probabilities.
"""

from __future__ import annotations

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from workers.observability import telemetry
from workers.serving.models.base import compute_dtype
from workers.serving.registry import ModelSpec, resolve_source


class TextClassifier:
    """A resident text classifier. ``run_batch`` is called only by its batcher's device thread."""

    kind = "classify"
    input_kind = "texts"

    def __init__(self, spec: ModelSpec, device: str):
        self.spec = spec
        self.device = device
        self.dtype = compute_dtype(spec, device)
        location, revision = resolve_source(spec)
        self.tokenizer = AutoTokenizer.from_pretrained(location, revision=revision, trust_remote_code=False)
        self.model = AutoModelForSequenceClassification.from_pretrained(
            location, revision=revision, trust_remote_code=False, dtype=self.dtype, attn_implementation="sdpa",
        ).to(device).eval()
        self.labels = [self.model.config.id2label[i] for i in range(self.model.config.num_labels)]

    def encode_each(self, texts: list[str]) -> list[list[int]]:
        """Token ids per text, truncated at ``max_seq_len``, unpadded."""
        return self.tokenizer(texts, truncation=True, max_length=self.spec.max_seq_len)["input_ids"]

    @torch.inference_mode()
    def run_batch(self, id_lists: list[list[int]], info: object = None) -> list[torch.Tensor]:
        """Return one probability vector (float32, CPU) per input."""
        padded = self.tokenizer.pad({"input_ids": id_lists}, padding=True, return_tensors="pt")
        encoded = {name: tensor.to(self.device, non_blocking=True) for name, tensor in padded.items()}
        with telemetry.forward_span(self.spec.name, "classify", self.device, self.dtype,
                                    tuple(padded["input_ids"].shape)):
            logits = self.model(**encoded).logits.float()
            probabilities = torch.softmax(logits, dim=-1).cpu()
        return list(probabilities.unbind(0))

    def warmup(self) -> None:
        self.run_batch(self.encode_each(["warm-up sentence"]))
