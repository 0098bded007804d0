"""Sentence embeddings from a BERT-style encoder: mean pooling over tokens, optional L2 norm.

Matches sentence-transformers' pipeline for models such as all-MiniLM-L6-v2
(Transformer -> mean Pooling -> Normalize).
"""

from __future__ import annotations

import torch
from transformers import AutoModel, AutoTokenizer

from workers.models.base import compute_dtype
from workers.registry import ModelSpec, resolve_source


class Embedder:
    """A resident encoder. ``embed`` is not thread-safe: one device thread calls it."""

    kind = "embed"

    def __init__(self, spec: ModelSpec, device: str):
        self.spec = spec
        self.device = device
        self.dtype = compute_dtype(spec, device)
        location, revision = resolve_source(spec)
        self.tokenizer = AutoTokenizer.from_pretrained(location, revision=revision, trust_remote_code=False)
        self.model = AutoModel.from_pretrained(
            location, revision=revision, trust_remote_code=False, dtype=self.dtype, attn_implementation="sdpa",
        ).to(device).eval()
        self.dim = int(self.model.config.hidden_size)

    def encode_each(self, texts: list[str]) -> list[list[int]]:
        """Token ids per text, truncated at ``max_seq_len``, unpadded (cheap; runs in task threads)."""
        return self.tokenizer(texts, truncation=True, max_length=self.spec.max_seq_len)["input_ids"]

    @torch.inference_mode()
    def run_batch(self, id_lists: list[list[int]], info: object = None) -> list[torch.Tensor]:
        """Forward one padded batch; return one float32 CPU vector (un-normalised) per input."""
        padded = self.tokenizer.pad({"input_ids": id_lists}, padding=True, return_tensors="pt")
        encoded = {name: tensor.to(self.device, non_blocking=True) for name, tensor in padded.items()}
        hidden = self.model(**encoded).last_hidden_state
        mask = encoded["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = ((hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)).float().cpu()
        return list(pooled.unbind(0))

    def embed(self, texts: list[str], normalize: bool = True) -> list[list[float]]:
        """Embed ``texts`` in one forward pass, bypassing any batcher; one vector per text."""
        return finish_vectors(self.run_batch(self.encode_each(texts)), normalize)

    def warmup(self) -> None:
        """Run forward passes so first-job latency excludes lazy initialisation."""
        self.embed(["warm-up sentence"] * min(2, self.spec.max_batch_size))


def finish_vectors(vectors: list[torch.Tensor], normalize: bool) -> list[list[float]]:
    """Stack per-text vectors, L2-normalise if asked, and return plain lists for JSON."""
    stacked = torch.stack(vectors)
    if normalize:
        stacked = torch.nn.functional.normalize(stacked, p=2, dim=1)
    return stacked.tolist()
