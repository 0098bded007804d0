"""Export a registry model to ONNX, check the graph against PyTorch, optionally quantize it to int8.

``export_model(spec, out_dir, quantize=None)`` writes an export directory
(``workers.serving.onnx_manifest``) for

* ``embed`` models (a transformers encoder): the encoder plus mean pooling over the attention
  mask, inside the graph, so the graph returns one float32 vector per text (not normalised:
  the worker normalises per request, as for the PyTorch backend);
* ``classify`` text models (``*ForSequenceClassification``) and the MLP/CNN classifiers Fleet
  trains: the model plus softmax, one probability vector per input;

with dynamic ``batch`` (and, for text, ``sequence``) axes, the tokenizer files beside the graph,
and the manifest. Graphs come from ``torch.onnx.export(..., dynamo=True)`` (the torch.export
based exporter, the default since torch 2.9; the TorchScript one is deprecated), at opset
``OPSET``.

The export checks itself before it writes anything: ONNX Runtime and PyTorch run the same
inputs (fixed sentences of many lengths, or seeded random features in the model's input
range, one at a time and as one padded batch), and a graph whose outputs differ is refused
(``OutputMismatch``): embeddings need a cosine of at least 0.9999 for every input, probabilities
may differ by at most 1e-4 (``FP32_EMBEDDING_BAR``, ``FP32_PROBABILITY_BAR``). ``quantize="int8"``
then applies ONNX Runtime's dynamic quantization (int8 weights, per output channel, on MatMul,
Gemm and Conv; activations quantized per batch at run time) and holds the int8 graph to
``INT8_EMBEDDING_BAR`` / ``INT8_PROBABILITY_BAR`` against PyTorch. The measured agreement
(against PyTorch, and for int8 also against the fp32 graph) goes into the manifest.

Nothing is left behind by a refused export: the directory is built under a temporary name
beside ``out_dir`` and renamed into place only once every check passed.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import uuid
import warnings
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path

import numpy as np
import torch

from producer.contract import ModelKind
from workers.serving.onnx_manifest import (
    BATCH_AXIS,
    GRAPH_FILE,
    MANIFEST_FILE,
    OPSET,
    SEQUENCE_AXIS,
    Agreement,
    OnnxManifest,
    SourceModel,
    TensorSpec,
    expected_io,
    sha256_file,
    weights_digest,
    write_manifest,
)
from workers.serving.registry import Backend, ModelSpec, resolve_source

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Bar:
    """What a graph must reach against PyTorch: ``worst`` for every input (cosine at least, or
    probability difference at most), and ``mean`` over all of them where set."""

    worst: float
    mean: float | None = None


#: fp32 embeddings: every input's vector within a cosine of 0.9999 of PyTorch's.
FP32_EMBEDDING_BAR = Bar(worst=0.9999)
#: fp32 probabilities: none more than 1e-4 from PyTorch's.
FP32_PROBABILITY_BAR = Bar(worst=1e-4)
#: int8 embeddings: cosine 0.99 to PyTorch's on average, and no input below 0.98 (very short texts
#: fare worst: dynamic quantization scales activations per tensor, and a few tokens set the scale).
INT8_EMBEDDING_BAR = Bar(worst=0.98, mean=0.99)
#: int8 probabilities: none more than 0.1 from PyTorch's, 0.02 on average (measured here: the
#: digits MLP 0.022 / 0.0008, the CNN 0.028 / 0.0018, the demo topics classifier 0.057 / 0.0088).
INT8_PROBABILITY_BAR = Bar(worst=0.1, mean=0.02)
#: Operators whose weights int8 quantization turns into integers.
INT8_OPERATORS = ["MatMul", "Gemm", "Conv"]
QUANTIZATIONS = ("int8",)
#: What exporting needs beyond the worker extra (``pip install 'fleet[onnx]'``).
EXPORT_PACKAGES = ("onnx", "onnxscript", "onnxruntime")

#: Sentences the text check runs: many lengths, punctuation, digits, non-ASCII, one past any limit.
CHECK_SENTENCES = [
    "Hi.",
    "A man is playing a guitar.",
    "The stock market fell sharply today after the bank raised interest rates.",
    "Rain is expected over the weekend, with strong winds on Saturday night.",
    "Birds build nests in spring.",
    "Ça coûte 12,50 € — c'est cher !",
    "The quick brown fox jumps over the lazy dog; 1234567890.",
    "Elephants live in herds and remember the paths to water for decades.",
    " ".join(["A long document that goes on and on about many things."] * 60),
]
#: How many random feature vectors the feature-classifier check runs.
CHECK_FEATURE_SAMPLES = 64


class ExportError(Exception):
    """An export that was refused; nothing was written to the output directory."""


class NotExportable(ExportError):
    """The model cannot be exported to ONNX by Fleet (its kind, backend or output directory)."""


class OutputMismatch(ExportError):
    """The ONNX graph's outputs differ from the PyTorch model's by more than the stated bar."""

    def __init__(self, message: str, agreement: Agreement):
        super().__init__(message)
        self.agreement = agreement


@dataclass
class Exportable:
    """A PyTorch module ready to export and what the manifest says of it.

    ``module`` takes the graph inputs positionally, in ``expected_io`` order, and returns the one
    output. ``example`` is the input export traces with (batch 2, so that no axis is taken for a
    constant 1); ``check_batches`` are the inputs the check runs, by input name.
    ``save_beside`` writes extra files (the tokenizer) into the export directory.
    """

    module: torch.nn.Module
    kind: ModelKind
    input_kind: str
    example: tuple[torch.Tensor, ...]
    check_batches: list[dict[str, np.ndarray]]
    source: SourceModel
    dim: int | None = None
    labels: list[str] | None = None
    max_positions: int | None = None
    input_shape: list[int] | None = None
    save_beside: Callable[[Path], None] | None = None

    def io(self) -> tuple[list[TensorSpec], list[TensorSpec]]:
        return expected_io(self.kind, self.input_kind, dim=self.dim, labels=self.labels,
                           input_shape=self.input_shape)


def _mean_pooled(output, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean of the encoder's token states over the attention mask: float32 [batch, hidden]."""
    weights = attention_mask.unsqueeze(-1).to(torch.float32)
    return (output.last_hidden_state.float() * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)


def _probabilities(output, attention_mask: torch.Tensor) -> torch.Tensor:
    """Softmax of a sequence classifier's logits: float32 [batch, labels]."""
    return torch.softmax(output.logits.float(), dim=-1)


class _TextGraph(torch.nn.Module):
    """A transformers text model and what Fleet computes after it inside the graph
    (``finish(model output, mask)``): (ids, 0/1 mask) -> float32 [batch, n]."""

    def __init__(self, model: torch.nn.Module, finish: Callable[[object, torch.Tensor], torch.Tensor]):
        super().__init__()
        self.model = model
        self.finish = finish

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.finish(self.model(input_ids=input_ids, attention_mask=attention_mask), attention_mask)


class _FeatureProbabilities(torch.nn.Module):
    """Feature classifier + softmax: float32 [batch, *input_shape] -> float32 [batch, labels]."""

    def __init__(self, classifier: torch.nn.Module):
        super().__init__()
        self.classifier = classifier

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.classifier(features).float(), dim=-1)


# --- building the exportable module ------------------------------------------------------------


def exportable_for(spec: ModelSpec) -> Exportable:
    """The ``Exportable`` of a registry entry served by PyTorch; ``NotExportable`` otherwise."""
    if spec.backend is not Backend.TORCH:
        raise NotExportable(f"model {spec.name!r} is already served from an ONNX export ({spec.source})")
    if spec.kind is ModelKind.GENERATE:
        raise NotExportable(f"model {spec.name!r} generates text: Fleet exports embed and classify models only")
    from workers.serving.models.feature_classifier import is_feature_classifier

    if is_feature_classifier(spec):
        return _feature_exportable(spec)
    return _text_exportable(spec)


def _source_model(spec: ModelSpec, directory: Path) -> SourceModel:
    digest, files = weights_digest(directory)
    return SourceModel(name=spec.name, location=spec.source, sha256=digest, files=files)


def _text_exportable(spec: ModelSpec) -> Exportable:
    from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer

    location, revision = resolve_source(spec)
    tokenizer = AutoTokenizer.from_pretrained(location, revision=revision, trust_remote_code=False)
    loader = AutoModel if spec.kind is ModelKind.EMBED else AutoModelForSequenceClassification
    model = loader.from_pretrained(location, revision=revision, trust_remote_code=False, dtype=torch.float32,
                                   attn_implementation="sdpa").eval()
    max_positions = int(getattr(model.config, "max_position_embeddings", spec.max_seq_len))
    longest = min(spec.max_seq_len, max_positions)

    def encode(texts: list[str]) -> dict[str, np.ndarray]:
        encoded = tokenizer(texts, truncation=True, max_length=longest, padding=True, return_tensors="np")
        return {name: encoded[name].astype(np.int64) for name in ("input_ids", "attention_mask")}

    example = encode(CHECK_SENTENCES[1:3])
    checks = [encode([text]) for text in CHECK_SENTENCES] + [encode(CHECK_SENTENCES)]
    common = dict(input_kind="texts", example=(torch.from_numpy(example["input_ids"]),
                                               torch.from_numpy(example["attention_mask"])),
                  check_batches=checks, source=_source_model(spec, Path(location)), max_positions=max_positions,
                  save_beside=tokenizer.save_pretrained)
    if spec.kind is ModelKind.EMBED:
        return Exportable(module=_TextGraph(model, _mean_pooled).eval(), kind=ModelKind.EMBED,
                          dim=int(model.config.hidden_size), **common)
    labels = [model.config.id2label[i] for i in range(model.config.num_labels)]
    return Exportable(module=_TextGraph(model, _probabilities).eval(), kind=ModelKind.CLASSIFY, labels=labels,
                      **common)


def _feature_exportable(spec: ModelSpec) -> Exportable:
    from workers.training.models import CLASSIFIER_CONFIG, load_classifier

    directory = Path(spec.source[4:])
    config = json.loads((directory / CLASSIFIER_CONFIG).read_text(encoding="utf-8"))
    model, labels = load_classifier(directory, "cpu")
    shape = [int(size) for size in config["input_shape"]]
    low, high = config.get("input_range", [0.0, 1.0])
    samples = np.random.default_rng(0).uniform(low, high, size=(CHECK_FEATURE_SAMPLES, *shape)).astype(np.float32)
    checks = [{"features": samples[i:i + 1]} for i in range(4)] + [{"features": samples}]
    return Exportable(module=_FeatureProbabilities(model).eval(), kind=ModelKind.CLASSIFY, input_kind="features",
                      example=(torch.from_numpy(samples[:2]),), check_batches=checks,
                      source=_source_model(spec, directory), labels=labels, input_shape=shape)


# --- the check -----------------------------------------------------------------------------------


def _reference_outputs(exportable: Exportable) -> list[np.ndarray]:
    with torch.inference_mode():
        return [exportable.module(*(torch.from_numpy(batch[spec.name]) for spec in exportable.io()[0])).numpy()
                for batch in exportable.check_batches]


def measure_agreement(kind: ModelKind, want: list[np.ndarray], got: list[np.ndarray], *, against: str,
                      bar: Bar) -> Agreement:
    """Compare two runs of the check batches: per-vector cosine for ``embed``, per-probability
    absolute difference (plus top-1 label agreement) for ``classify``. Outputs that are not all
    finite count as the worst possible agreement."""
    want_rows, got_rows = np.concatenate(want).astype(np.float64), np.concatenate(got).astype(np.float64)
    finite = bool(np.isfinite(got_rows).all() and np.isfinite(want_rows).all())
    common = dict(against=against, worst_bar=bar.worst, mean_bar=bar.mean, samples=len(want_rows))
    if kind is ModelKind.EMBED:
        norms = np.linalg.norm(want_rows, axis=1) * np.linalg.norm(got_rows, axis=1)
        cosines = (want_rows * got_rows).sum(axis=1) / np.maximum(norms, 1e-12) if finite else np.array([-1.0])
        return Agreement(metric="cosine", worst=float(cosines.min()), mean=float(cosines.mean()), **common)
    differences = np.abs(want_rows - got_rows) if finite else np.array([np.inf])
    top1 = float(np.mean(want_rows.argmax(axis=1) == got_rows.argmax(axis=1)))
    return Agreement(metric="abs_diff", worst=float(differences.max()), mean=float(differences.mean()),
                     top1_agreement=top1, **common)


def _run_graph(path: Path, exportable: Exportable) -> tuple[list[TensorSpec], list[TensorSpec], list[np.ndarray]]:
    """The graph's inputs and outputs as ONNX Runtime sees them, and its outputs on the check batches."""
    from workers.serving.models.onnx_models import open_session, session_io

    session, _ = open_session(path)
    inputs, outputs = session_io(session)
    return inputs, outputs, [session.run(None, batch)[0] for batch in exportable.check_batches]


def _checked(agreement: Agreement, what: str) -> Agreement:
    if not agreement.passed:
        relation = ">=" if agreement.metric == "cosine" else "<="
        needs = f"worst {relation} {agreement.worst_bar:g}" + (
            f" and mean {relation} {agreement.mean_bar:g}" if agreement.mean_bar is not None else "")
        raise OutputMismatch(f"{what} differs from {agreement.against} over {agreement.samples} inputs: "
                             f"{agreement.metric} worst {agreement.worst:.6g}, mean {agreement.mean:.6g}; "
                             f"needs {needs}; nothing written", agreement)
    return agreement


# --- writing -------------------------------------------------------------------------------------


def export_model(spec: ModelSpec, out_dir: Path, quantize: str | None = None) -> OnnxManifest:
    """Export ``spec`` into ``out_dir`` (replacing an earlier export there); return its manifest.

    Raises ``NotExportable`` (also when the ``onnx`` extra is not installed) or ``OutputMismatch``
    (both ``ExportError``) and then writes nothing.
    """
    if quantize is not None and quantize not in QUANTIZATIONS:
        raise NotExportable(f"quantization {quantize!r} is not one of {', '.join(QUANTIZATIONS)}")
    missing = [package for package in EXPORT_PACKAGES if importlib.util.find_spec(package) is None]
    if missing:
        raise NotExportable(f"{', '.join(missing)} not installed: pip install 'fleet[onnx]'")
    _check_destination(Path(out_dir))
    return write_export(exportable_for(spec), Path(out_dir), quantize)


def _check_destination(out_dir: Path) -> None:
    if out_dir.exists() and (not out_dir.is_dir() or (any(out_dir.iterdir())
                                                      and not (out_dir / MANIFEST_FILE).is_file())):
        raise NotExportable(f"{out_dir} exists and is not an ONNX export directory: not overwriting it")


def write_export(exportable: Exportable, out_dir: Path, quantize: str | None = None) -> OnnxManifest:
    """Export, check, optionally quantize, and publish ``exportable`` as the directory ``out_dir``."""
    out_dir = Path(out_dir)
    _check_destination(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = out_dir.parent / f".{out_dir.name}.{uuid.uuid4().hex}.tmp"
    staging.mkdir()
    try:
        manifest = _build(exportable, staging, quantize)
        _publish(staging, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("exported %s to %s (%s, %s)", exportable.source.name, out_dir, manifest.precision,
             ", ".join(f"{a.metric} vs {a.against}: worst {a.worst:.6g}, mean {a.mean:.6g}"
                       for a in manifest.agreement))
    return manifest


def _build(exportable: Exportable, staging: Path, quantize: str | None) -> OnnxManifest:
    inputs, outputs = exportable.io()
    fp32 = staging / ("fp32.onnx" if quantize else GRAPH_FILE)
    batch = torch.export.Dim(BATCH_AXIS)
    axes = {0: batch, 1: torch.export.Dim(SEQUENCE_AXIS)} if exportable.input_kind == "texts" else {0: batch}
    dynamic = {spec.name: axes for spec in inputs}
    with warnings.catch_warnings():  # the exporter's own deprecation and axis-naming notes
        warnings.simplefilter("ignore", (FutureWarning, DeprecationWarning, UserWarning))
        program = torch.onnx.export(exportable.module, exportable.example, dynamo=True, verbose=False,
                                    opset_version=OPSET, input_names=[s.name for s in inputs],
                                    output_names=[s.name for s in outputs], dynamic_shapes=dynamic)
        assert program is not None  # torch.onnx.export returns None only when dynamo=False
        program.save(str(fp32), external_data=False)
    graph_inputs, graph_outputs, got = _run_graph(fp32, exportable)
    if (graph_inputs, graph_outputs) != (inputs, outputs):
        raise NotExportable(f"the exporter produced inputs {graph_inputs} and outputs {graph_outputs}, "
                            f"expected {inputs} and {outputs}")
    want = _reference_outputs(exportable)
    embed = exportable.kind is ModelKind.EMBED
    agreement = [_checked(measure_agreement(exportable.kind, want, got, against="torch",
                                            bar=FP32_EMBEDDING_BAR if embed else FP32_PROBABILITY_BAR),
                          "the fp32 ONNX graph")]
    if quantize:
        agreement = _quantize_int8(fp32, staging / GRAPH_FILE, exportable, want, got)
        fp32.unlink()
    if exportable.save_beside is not None:
        exportable.save_beside(staging)
    manifest = OnnxManifest(
        kind=exportable.kind, input_kind=exportable.input_kind, graph_sha256=sha256_file(staging / GRAPH_FILE),
        opset=OPSET, precision=quantize or "fp32", inputs=inputs, outputs=outputs, source=exportable.source,
        parameters=sum(p.numel() for p in exportable.module.parameters()), dim=exportable.dim,
        labels=exportable.labels, max_positions=exportable.max_positions, input_shape=exportable.input_shape,
        agreement=agreement, versions=_versions(), created_at=datetime.now(UTC).isoformat(timespec="seconds"))
    write_manifest(manifest, staging)
    return manifest


def _quantize_int8(fp32: Path, int8: Path, exportable: Exportable, torch_outputs: list[np.ndarray],
                   fp32_outputs: list[np.ndarray]) -> list[Agreement]:
    """Dynamic int8 quantization of ``fp32`` into ``int8``; its agreement with PyTorch (judged)
    and with the fp32 graph (recorded)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with _quantizer_chatter_muted():
        quantize_dynamic(str(fp32), str(int8), weight_type=QuantType.QInt8, per_channel=True,
                         op_types_to_quantize=INT8_OPERATORS)
    _, _, got = _run_graph(int8, exportable)
    bar = INT8_EMBEDDING_BAR if exportable.kind is ModelKind.EMBED else INT8_PROBABILITY_BAR
    versus_torch = _checked(measure_agreement(exportable.kind, torch_outputs, got, against="torch", bar=bar),
                            "the int8 ONNX graph")
    versus_fp32 = measure_agreement(exportable.kind, fp32_outputs, got, against="onnx-fp32", bar=bar)
    return [versus_torch, versus_fp32]


@contextmanager
def _quantizer_chatter_muted():
    """Drop the quantizer's own info and warning lines (one per tensor, logged on the root logger)
    while it runs; errors still show. Records of other loggers are not affected."""

    def keep(record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR or "onnxruntime" not in record.pathname

    root = logging.getLogger()
    root.addFilter(keep)
    try:
        yield
    finally:
        root.removeFilter(keep)


def _publish(staging: Path, out_dir: Path) -> None:
    """Move the finished ``staging`` directory to ``out_dir``, replacing an earlier export there."""
    displaced = out_dir.parent / f".{out_dir.name}.{uuid.uuid4().hex}.old"
    if out_dir.exists():
        os.rename(out_dir, displaced)
    try:
        os.rename(staging, out_dir)
    finally:
        shutil.rmtree(displaced, ignore_errors=True)


def _versions() -> dict[str, str]:
    found = {}
    for package in ("torch", "transformers", "onnx", "onnxscript", "onnxruntime"):
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            continue
    return found


def export_trained_classifier(artifact: str, name: str) -> str:
    """Export a training job's finished MLP/CNN (its model directory ``artifact``) into
    ``<artifact>/onnx`` (fp32, checked); return that directory. Raises ``ExportError``."""
    spec = ModelSpec(name=name, kind=ModelKind.CLASSIFY, source=f"dir:{Path(artifact).resolve()}")
    out_dir = Path(artifact) / "onnx"
    export_model(spec, out_dir)
    return str(out_dir)
