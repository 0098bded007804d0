"""Resident models served by ONNX Runtime from an export directory (registry ``backend = "onnxruntime"``).

The same interface as the PyTorch classes, so the same batcher, tasks and results serve them:
``OnnxEmbedder`` (like ``Embedder``: ``encode_each``, ``run_batch``, ``embed``, ``dim``),
``OnnxTextClassifier`` (like ``TextClassifier``: ``encode_each``, ``run_batch``, ``labels``) and
``OnnxFeatureClassifier`` (like ``FeatureClassifier``: ``check_features``, ``run_batch``,
``labels``). ``run_batch(items, info)`` returns one float32 CPU tensor per input; every class has
``warmup``, ``kind``, ``input_kind``, ``device`` (where the graph runs), ``dtype`` (``float32``, or
``int8`` for a quantized export), ``parameter_count`` (the source model's, from the manifest) and
``providers`` (ONNX Runtime's execution providers, in order of preference).

``open_onnx_model(spec, device)`` checks the directory before anything is served and raises
``OnnxModelError`` (the worker then refuses this model and serves its others) unless: the
manifest is there and well formed, its kind is the registry entry's, the graph's SHA-256 is the
manifest's, ONNX Runtime loads the graph, and the graph's inputs and outputs are exactly the
manifest's, which are exactly what Fleet's graphs of that kind have.

Execution: the CPU execution provider, with as many intra-op threads as torch uses
(``torch.get_num_threads()``: the worker sets it from ``FLEET_TORCH_THREADS`` before loading) and
one inter-op thread. On a ``cuda:N`` worker the CUDA execution provider runs the graph when the
installed onnxruntime has it (the ``onnxruntime-gpu`` build); otherwise the model runs on the CPU
and the worker logs why. ONNX Runtime's intra-op threads spin while waiting for work unless
``OMP_WAIT_POLICY=PASSIVE``, the same switch that stops torch's OpenMP threads from spinning.
"""

from __future__ import annotations

import abc
import logging
import os
from pathlib import Path

import numpy as np
import torch

from workers.observability import telemetry
from workers.serving.models.feature_classifier import check_feature_lengths
from workers.serving.onnx_manifest import (
    OnnxManifest,
    OnnxModelError,
    TensorSpec,
    check_graph_file,
    manifest_io,
    read_manifest,
)
from workers.serving.refusal import ModelRefused
from workers.serving.registry import ModelSpec, RegistryError, resolve_source

log = logging.getLogger(__name__)

#: ONNX Runtime's tensor type names -> the manifest's.
_ORT_DTYPES = {"tensor(int64)": "int64", "tensor(float)": "float32"}


class OnnxRuntimeMissing(ModelRefused):
    """The registry entry asks for ONNX Runtime, which is not installed in this worker."""


def _runtime():
    try:
        import onnxruntime
    except ImportError:
        raise OnnxRuntimeMissing("backend onnxruntime needs the onnx extra: pip install 'fleet[onnx]'") from None
    return onnxruntime


def _load_errors(onnxruntime) -> tuple[type[Exception], ...]:
    """Every exception class ONNX Runtime's binding raises (they derive from Exception directly)."""
    state = onnxruntime.capi.onnxruntime_pybind11_state
    return tuple(value for value in vars(state).values() if isinstance(value, type) and issubclass(value, Exception))


def open_session(graph: Path, device: str = "cpu"):
    """``(InferenceSession, device the graph runs on)`` for ``graph``, set up as the module docstring says.

    Raises ``OnnxRuntimeMissing`` or ``OnnxModelError`` (a file ONNX Runtime cannot load).
    """
    onnxruntime = _runtime()
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
    if os.environ.get("OMP_WAIT_POLICY", "").upper() == "PASSIVE":
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    providers: list = ["CPUExecutionProvider"]
    if device.startswith("cuda"):
        if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
            providers.insert(0, ("CUDAExecutionProvider", {"device_id": int(device.partition(":")[2] or 0)}))
        else:
            log.warning("onnxruntime %s has no CUDA execution provider (install onnxruntime-gpu): %s runs on the CPU",
                        onnxruntime.__version__, graph)
    try:
        session = onnxruntime.InferenceSession(str(graph), options, providers=providers)
    except _load_errors(onnxruntime) as exc:
        raise OnnxModelError(f"ONNX Runtime cannot load {graph}: {exc}") from None
    runs_on = device if "CUDAExecutionProvider" in session.get_providers() else "cpu"
    return session, runs_on


def session_io(session) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """A session's inputs and outputs as the manifest writes them (unknown axes as ``"?"``)."""

    def spec(node) -> TensorSpec:
        shape = [dim if isinstance(dim, (int, str)) else "?" for dim in node.shape]
        return TensorSpec(name=node.name, dtype=_ORT_DTYPES.get(node.type, node.type), shape=shape)

    return [spec(node) for node in session.get_inputs()], [spec(node) for node in session.get_outputs()]


def open_onnx_model(spec: ModelSpec, device: str):
    """Check ``spec``'s export directory and return its resident model; ``OnnxModelError`` if unsound."""
    try:
        directory = Path(resolve_source(spec)[0])
    except RegistryError as exc:
        raise OnnxModelError(str(exc)) from None
    manifest = read_manifest(directory)
    if manifest.kind is not spec.kind:
        raise OnnxModelError(f"{directory} holds a {manifest.kind.value} model, the registry serves "
                             f"{spec.name!r} as {spec.kind.value}")
    implementation = _IMPLEMENTATIONS.get((manifest.kind.value, manifest.input_kind))
    if implementation is None:
        raise OnnxModelError(f"{directory}: Fleet serves no {manifest.kind.value} model on {manifest.input_kind}")
    session, runs_on = open_session(check_graph_file(directory, manifest), device)
    found, wanted = session_io(session), (manifest.inputs, manifest.outputs)
    if found != wanted or wanted != manifest_io(manifest):
        raise OnnxModelError(f"{directory / manifest.graph_file} has inputs {found[0]} and outputs {found[1]}; "
                             f"a {manifest.kind.value} export needs {manifest_io(manifest)[0]} and "
                             f"{manifest_io(manifest)[1]}, its manifest says {wanted[0]} and {wanted[1]}")
    return implementation(spec, runs_on, directory, manifest, session)


class _OnnxModel:
    """What every ONNX Runtime model shares: the checked session and the manifest's facts."""

    input_kind = "texts"

    def __init__(self, spec: ModelSpec, device: str, directory: Path, manifest: OnnxManifest, session):
        self.spec = spec
        self.device = device
        self.directory = directory
        self.manifest = manifest
        self.session = session
        self.kind = manifest.kind.value
        self.dtype = "int8" if manifest.precision == "int8" else "float32"
        self.parameter_count = manifest.parameters
        self.providers = session.get_providers()
        self._output = manifest.outputs[0].name

    def _forward(self, feed: dict[str, np.ndarray], *, record_norms: bool = False) -> torch.Tensor:
        """Run the graph on ``feed`` inside a forward span; its output as a float32 CPU tensor."""
        shape = next(iter(feed.values())).shape
        with telemetry.forward_span(self.spec.name, self.kind, self.device, self.dtype, shape) as span:
            output = torch.from_numpy(self.session.run([self._output], feed)[0])
            if record_norms:
                telemetry.record_embedding_norms(span, output)
        return output


class _OnnxTextModel(_OnnxModel, abc.ABC):
    """A text graph: tokenizer files beside it, truncation at the registry's ``max_seq_len``."""

    def __init__(self, spec: ModelSpec, device: str, directory: Path, manifest: OnnxManifest, session):
        super().__init__(spec, device, directory, manifest, session)
        from transformers import AutoTokenizer

        try:
            self.tokenizer = AutoTokenizer.from_pretrained(directory, trust_remote_code=False)
        except (OSError, ValueError) as exc:
            raise OnnxModelError(f"{directory}: no usable tokenizer beside the graph: {exc}") from None
        self.max_seq_len = min(spec.max_seq_len, manifest.max_positions or spec.max_seq_len)

    def encode_each(self, texts: list[str]) -> list[list[int]]:
        """Token ids per text, truncated at ``max_seq_len``, unpadded."""
        return self.tokenizer(texts, truncation=True, max_length=self.max_seq_len)["input_ids"]

    def _feed(self, id_lists: list[list[int]]) -> dict[str, np.ndarray]:
        """Token ids right-padded to the longest, and their 0/1 attention mask, as int64 arrays."""
        padded = self.tokenizer.pad({"input_ids": id_lists}, padding=True, return_tensors="np")
        return {name: padded[name].astype(np.int64, copy=False) for name in ("input_ids", "attention_mask")}

    @abc.abstractmethod
    def run_batch(self, id_lists: list[list[int]], info: object = None) -> list[torch.Tensor]:
        """One float32 output row per input's token ids (the batcher calls it)."""

    def warmup(self) -> None:
        self.run_batch(self.encode_each(["warm-up sentence", "a second, somewhat longer warm-up sentence"]))


class OnnxEmbedder(_OnnxTextModel):
    """Sentence embeddings from an exported encoder with mean pooling inside the graph."""

    def __init__(self, spec: ModelSpec, device: str, directory: Path, manifest: OnnxManifest, session):
        super().__init__(spec, device, directory, manifest, session)
        if manifest.dim is None:
            raise OnnxModelError(f"{directory}: the manifest of an embed model gives no dim")
        self.dim = manifest.dim

    def run_batch(self, id_lists: list[list[int]], info: object = None) -> list[torch.Tensor]:
        """One pooled (not normalised) float32 vector per input."""
        return list(self._forward(self._feed(id_lists), record_norms=True).unbind(0))

    def embed(self, texts: list[str], normalize: bool = True) -> list[list[float]]:
        """Embed ``texts`` in one run, bypassing any batcher; one vector per text."""
        from workers.serving.models.embedder import finish_vectors

        return finish_vectors(self.run_batch(self.encode_each(texts)), normalize)


class OnnxTextClassifier(_OnnxTextModel):
    """Text classification from an exported sequence classifier with softmax inside the graph."""

    def __init__(self, spec: ModelSpec, device: str, directory: Path, manifest: OnnxManifest, session):
        super().__init__(spec, device, directory, manifest, session)
        self.labels = list(manifest.labels or [])

    def run_batch(self, id_lists: list[list[int]], info: object = None) -> list[torch.Tensor]:
        """One probability vector (float32, CPU) per input."""
        return list(self._forward(self._feed(id_lists)).unbind(0))


class OnnxFeatureClassifier(_OnnxModel):
    """An exported MLP/CNN classifier on feature vectors, softmax inside the graph."""

    input_kind = "features"

    def __init__(self, spec: ModelSpec, device: str, directory: Path, manifest: OnnxManifest, session):
        super().__init__(spec, device, directory, manifest, session)
        self.labels = list(manifest.labels or [])
        self.input_shape = tuple(manifest.input_shape or [])
        self.features = int(np.prod(self.input_shape))

    def check_features(self, inputs: list[list[float]]) -> list[list[float]]:
        """Refuse (``invalid_input``) vectors of the wrong length; return them unchanged."""
        return check_feature_lengths(self.spec.name, self.features, inputs)

    def run_batch(self, vectors: list[list[float]], info: object = None) -> list[torch.Tensor]:
        """One probability vector (float32, CPU) per input vector."""
        batch = np.asarray(vectors, dtype=np.float32).reshape(-1, *self.input_shape)
        return list(self._forward({self.manifest.inputs[0].name: batch}).unbind(0))

    def warmup(self) -> None:
        self.run_batch([[0.0] * self.features])


_IMPLEMENTATIONS = {("embed", "texts"): OnnxEmbedder, ("classify", "texts"): OnnxTextClassifier,
                    ("classify", "features"): OnnxFeatureClassifier}
