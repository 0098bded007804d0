"""Inference on resident models; each function returns a contract result.

Embedding and classification go through the model's batcher (many jobs, one device batch);
generation joins the model's continuous-batching engine (``workers.serving.generation``). Torch
is imported lazily so that importing the task module (e.g. from Flower) stays light.
"""

from __future__ import annotations

from producer.contract import (
    ClassifyRequest,
    ClassifyResult,
    EmbedRequest,
    EmbedResult,
    GenerateRequest,
    GenerateResult,
    LabelScore,
)
from workers.observability import telemetry
from workers.serving.runtime import ResidentModel


class Cancelled(Exception):
    """The job was cancelled while it ran; the task stores REVOKED."""


def embed(resident: ResidentModel, request: EmbedRequest, context=None) -> EmbedResult:
    """Tokenise here (task thread), batch the forward pass with other jobs, pool and normalise.

    The vectors go back as JSON floats, or with ``encoding="base64"`` as base64 text of their
    float32 bytes (no per-float Python object: far less GIL-held CPU for big jobs).
    """
    from workers.serving.models.embedder import finish_vectors, finish_vectors_b64

    with telemetry.tokenize_span(request.model, len(request.texts)) as span:
        id_lists = resident.impl.encode_each(list(request.texts))
        span.record_tokens(id_lists)
    futures = resident.batcher.submit(id_lists, costs=[len(ids) for ids in id_lists],
                                      context=telemetry.current_span_context())
    pooled = [future.result() for future in futures]
    impl = resident.impl
    if request.encoding == "base64":
        return EmbedResult(model=request.model, device=impl.device, dim=impl.dim, encoding="base64",
                           vectors_b64=finish_vectors_b64(pooled, request.normalize))
    return EmbedResult(model=request.model, device=impl.device, dim=impl.dim,
                       vectors=finish_vectors(pooled, request.normalize))


def classify(resident: ResidentModel, request: ClassifyRequest, context=None) -> ClassifyResult:
    """Batch the inputs with other jobs; return the ``top_k`` labels per input by softmax score."""
    impl = resident.impl
    if request.texts is not None and impl.input_kind == "texts":
        items = impl.encode_each(list(request.texts))
        costs = [len(ids) for ids in items]
    elif request.inputs is not None and impl.input_kind == "features":
        items = impl.check_features(request.inputs)
        costs = None
    else:
        from producer.contract import ErrorCode
        from producer.errors import JobFailedError

        raise JobFailedError(ErrorCode.INVALID_INPUT.value,
                             f"model {request.model!r} classifies {impl.input_kind}, not "
                             f"{'texts' if request.texts is not None else 'inputs'}")
    futures = resident.batcher.submit(items, costs=costs, context=telemetry.current_span_context())
    predictions = []
    for future in futures:
        probabilities = future.result()
        top = probabilities.topk(min(request.top_k, len(impl.labels)))
        predictions.append([LabelScore(label=impl.labels[i], score=float(s))
                            for s, i in zip(top.values.tolist(), top.indices.tolist())])
    return ClassifyResult(model=request.model, device=impl.device, predictions=predictions)


def generate(resident: ResidentModel, request: GenerateRequest, context) -> GenerateResult:
    """Decode in the model's continuous batch; stream pieces to Redis if asked; stop when cancelled."""
    from workers.serving.generation.job import run_generate_job

    return run_generate_job(resident.impl, request, context)
