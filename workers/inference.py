"""Inference on resident models through their batchers; each function returns a contract result."""

from __future__ import annotations

from producer.contract import EmbedRequest, EmbedResult
from workers.models.embedder import finish_vectors
from workers.runtime import ResidentModel


def embed(resident: ResidentModel, request: EmbedRequest) -> EmbedResult:
    """Tokenise here (task thread), batch the forward pass with other jobs, pool and normalise."""
    id_lists = resident.impl.encode_each(list(request.texts))
    futures = resident.batcher.submit(id_lists, costs=[len(ids) for ids in id_lists])
    vectors = finish_vectors([future.result() for future in futures], request.normalize)
    return EmbedResult(model=request.model, device=resident.impl.device, dim=resident.impl.dim, vectors=vectors)
