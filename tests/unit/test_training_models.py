"""Models: the classifiers' architectures and their safetensors + JSON format; the tiny Llama."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from workers.training import models
from workers.training.data import DIGIT_LABELS, train_tokenizer
from workers.training.models import load_classifier


@pytest.mark.parametrize(("architecture", "shape"), [("mlp", (5, 64)), ("cnn", (5, 1, 8, 8))])
def test_classifiers_save_and_load_to_identical_outputs(architecture: str, shape: tuple, tmp_path: Path) -> None:
    torch.manual_seed(0)
    config = models.digits_classifier_config(architecture, DIGIT_LABELS)
    module = models.build_classifier(config)
    module.train()(torch.rand(8, *shape[1:]))  # moves BatchNorm running statistics off their init
    module.eval()
    x = torch.rand(shape)
    models.save_classifier(module, config, tmp_path)

    saved = json.loads((tmp_path / "classifier.json").read_text())
    assert saved["labels"] == [str(d) for d in range(10)] and saved["input_shape"] == list(shape[1:])
    assert set(load_file(str(tmp_path / "model.safetensors"))) == set(module.state_dict())
    loaded, labels = load_classifier(tmp_path)
    assert labels == list("0123456789") and not loaded.training
    assert torch.equal(loaded(x), module(x))


def test_load_classifier_refuses_another_format(tmp_path: Path) -> None:
    config = models.digits_classifier_config("mlp", DIGIT_LABELS)
    models.save_classifier(models.build_classifier(config), {**config, "format": "other/9"}, tmp_path)
    with pytest.raises(ValueError, match="other/9"):
        load_classifier(tmp_path)


def test_mlp_has_three_linear_layers() -> None:
    mlp = models.build_classifier(models.digits_classifier_config("mlp", DIGIT_LABELS))
    linears = [m for m in mlp.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(64, 256), (256, 256), (256, 10)]


def test_cnn_has_the_resnet18_layout() -> None:
    cnn = models.build_classifier(models.digits_classifier_config("cnn", DIGIT_LABELS))
    blocks = [m for m in cnn.modules() if isinstance(m, models.BasicBlock)]
    assert len(blocks) == 8  # four stages of two basic blocks
    main_path_convs = [m for m in cnn.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)]
    linears = [m for m in cnn.modules() if isinstance(m, nn.Linear)]
    assert len(main_path_convs) + len(linears) == 18
    assert cnn(torch.rand(2, 1, 8, 8)).shape == (2, 10)


def test_tiny_llama_is_sized_by_its_tokenizer() -> None:
    tokenizer = train_tokenizer(["The Wolf and the Lamb. " * 20], vocab_size=300)
    model = models.build_tiny_llama(tokenizer)
    config = model.config
    assert config.vocab_size == len(tokenizer) and config.model_type == "llama"
    assert (config.hidden_size, config.num_attention_heads) == (128, 4)
    assert 2 <= config.num_hidden_layers <= 4
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (1, 2, 0)
    assert sum(p.numel() for p in model.parameters()) < 1_000_000
