"""What an ONNX export directory holds, and the checks that tell a sound one from a broken one.

An export directory, written by ``fleet models export NAME --format onnx --out DIR``:

* ``model.onnx``: the graph with its weights inside (one file, so one hash covers it);
* ``manifest.json``: an ``OnnxManifest`` (below): what the graph computes, its inputs and
  outputs, the model it came from and that model's hash, the graph's own hash, and how closely
  its outputs matched the PyTorch model's when it was exported;
* for text models, the tokenizer files as transformers' ``save_pretrained`` writes them.

Every graph Fleet writes has one of two input sets and one of two outputs (``expected_io``):
``input_ids`` and ``attention_mask`` (int64, ``[batch, sequence]``) for text models or
``features`` (float32, ``[batch, *input_shape]``) for feature classifiers; and
``sentence_embedding`` (float32 ``[batch, dim]``, mean-pooled, not normalised) for ``embed``
or ``probabilities`` (float32 ``[batch, labels]``, softmax) for ``classify``.

Imports neither torch nor onnxruntime: the registry, the exporter and the ONNX Runtime
models all read it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Final, Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from producer.contract import ModelKind
from workers.serving.refusal import ModelRefused

GRAPH_FILE = "model.onnx"
MANIFEST_FILE = "manifest.json"
MANIFEST_FORMAT: Final = "fleet-onnx/1"
#: The ai.onnx opset of every export: ``Gelu``, which BERT encoders use, is an opset-20 operator.
OPSET = 20
BATCH_AXIS = "batch"
SEQUENCE_AXIS = "sequence"
TEXT_INPUTS = ("input_ids", "attention_mask")
FEATURES_INPUT = "features"
EMBEDDING_OUTPUT = "sentence_embedding"
PROBABILITIES_OUTPUT = "probabilities"


class OnnxModelError(ModelRefused):
    """An ONNX export directory that cannot be served: no or malformed manifest, a graph whose
    hash, inputs or outputs differ from the manifest's, a graph ONNX Runtime cannot load, or a
    manifest for another kind of model than the registry entry's."""


class TensorSpec(BaseModel):
    """One graph input or output. ``shape`` holds a number per fixed axis and a name per dynamic one."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    dtype: Literal["int64", "float32"]
    shape: list[int | str]


class Agreement(BaseModel):
    """How closely the exported graph's outputs matched a reference on the same inputs.

    ``metric`` ``cosine``: cosine similarity between the two vectors of each input; ``worst`` is
    the smallest, ``mean`` the mean, and higher is better (passes when ``worst >= worst_bar`` and,
    if a ``mean_bar`` is set, ``mean >= mean_bar``). ``abs_diff``: absolute difference between the
    two outputs' probabilities; ``worst`` is the largest over every probability of every input,
    ``mean`` their mean, lower is better; ``top1_agreement`` is then the fraction of inputs whose
    best label is the same (recorded, not judged: near-ties may flip). ``against``: ``torch`` (the
    PyTorch model) or ``onnx-fp32`` (the fp32 graph an int8 one was quantized from).
    ``samples``: how many inputs were compared.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    against: Literal["torch", "onnx-fp32"]
    metric: Literal["cosine", "abs_diff"]
    worst: float
    mean: float
    worst_bar: float
    mean_bar: float | None = None
    samples: int
    top1_agreement: float | None = None

    @property
    def passed(self) -> bool:
        def within(value: float, bar: float) -> bool:
            return value >= bar if self.metric == "cosine" else value <= bar

        return within(self.worst, self.worst_bar) and (self.mean_bar is None or within(self.mean, self.mean_bar))


class SourceModel(BaseModel):
    """The model a graph was exported from: its registry name and source, and ``sha256``, the hash
    of its weight files (``files``, each hashed; the digest is over their names and hashes)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    location: str
    sha256: str
    files: dict[str, str]


class OnnxManifest(BaseModel):
    """``manifest.json`` of an export directory.

    ``precision`` ``int8``: weights quantized to int8 by ONNX Runtime's dynamic quantization
    (activations quantized per batch at run time). ``parameters`` is the source model's
    parameter count. Per kind: ``dim`` (embed: vector length), ``labels`` (classify: index =
    class id), ``max_positions`` (text models: the longest token sequence the encoder takes),
    ``input_shape`` (feature classifiers: the shape of one sample). ``versions``: the libraries
    that exported it.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    format: Literal["fleet-onnx/1"] = MANIFEST_FORMAT
    kind: ModelKind
    input_kind: Literal["texts", "features"]
    backend: Literal["onnxruntime"] = "onnxruntime"
    graph_file: str = GRAPH_FILE
    graph_sha256: str
    opset: int
    precision: Literal["fp32", "int8"]
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    source: SourceModel
    parameters: int
    dim: int | None = None
    labels: list[str] | None = None
    max_positions: int | None = None
    input_shape: list[int] | None = None
    agreement: list[Agreement]
    versions: dict[str, str]
    created_at: str


def expected_io(kind: ModelKind, input_kind: str, *, dim: int | None = None, labels: list[str] | None = None,
                input_shape: list[int] | None = None) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """The inputs and outputs a graph of this kind must have (module docstring)."""
    if input_kind == "texts":
        inputs = [TensorSpec(name=name, dtype="int64", shape=[BATCH_AXIS, SEQUENCE_AXIS]) for name in TEXT_INPUTS]
    else:
        inputs = [TensorSpec(name=FEATURES_INPUT, dtype="float32", shape=[BATCH_AXIS, *(input_shape or [])])]
    if kind is ModelKind.EMBED:
        outputs = [TensorSpec(name=EMBEDDING_OUTPUT, dtype="float32", shape=[BATCH_AXIS, dim])]
    else:
        outputs = [TensorSpec(name=PROBABILITIES_OUTPUT, dtype="float32", shape=[BATCH_AXIS, len(labels or [])])]
    return inputs, outputs


def manifest_io(manifest: OnnxManifest) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """``expected_io`` for the model a manifest describes."""
    return expected_io(manifest.kind, manifest.input_kind, dim=manifest.dim, labels=manifest.labels,
                       input_shape=manifest.input_shape)


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def weights_digest(directory: Path) -> tuple[str, dict[str, str]]:
    """``(digest, {file: sha256})`` over a model directory's weight files (``*.safetensors``,
    ``*.bin``, ``*.pt``); the digest covers each file's name and hash, in name order."""
    files = {path.name: sha256_file(path) for path in sorted(directory.iterdir())
             if path.is_file() and path.suffix in (".safetensors", ".bin", ".pt")}
    digest = hashlib.sha256("".join(f"{name}\0{sha}\n" for name, sha in files.items()).encode()).hexdigest()
    return digest, files


def read_manifest(directory: Path) -> OnnxManifest:
    """The manifest of an export directory; ``OnnxModelError`` if it is missing or malformed."""
    path = Path(directory) / MANIFEST_FILE
    try:
        return OnnxManifest.model_validate_json(path.read_bytes())
    except FileNotFoundError:
        raise OnnxModelError(f"{directory} has no {MANIFEST_FILE}: not an ONNX export directory") from None
    except ValidationError as exc:
        raise OnnxModelError(f"{path} is not a {MANIFEST_FORMAT} manifest: {exc}") from None


def check_graph_file(directory: Path, manifest: OnnxManifest) -> Path:
    """The graph's path, once its SHA-256 equals the manifest's; else ``OnnxModelError``."""
    graph = Path(directory) / manifest.graph_file
    if not graph.is_file():
        raise OnnxModelError(f"{graph} is missing")
    actual = sha256_file(graph)
    if actual != manifest.graph_sha256:
        raise OnnxModelError(f"{graph} has SHA-256 {actual}, the manifest says {manifest.graph_sha256}: "
                             "the file was changed or damaged after export")
    return graph


def write_manifest(manifest: OnnxManifest, directory: Path) -> Path:
    """Write ``manifest.json`` into ``directory``; return its path."""
    path = Path(directory) / MANIFEST_FILE
    path.write_text(json.dumps(manifest.model_dump(mode="json"), indent=2) + "\n", encoding="utf-8")
    return path
