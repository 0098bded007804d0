"""The trainable models and their on-disk formats.

Classifiers (``mlp``, ``cnn``) are saved as ``model.safetensors`` plus ``classifier.json``
(architecture, constructor arguments, input shape, label names) and come back through
``load_classifier``. The language model is a ``LlamaForCausalLM`` saved with
``save_pretrained`` next to its tokenizer, so ``from_pretrained(directory)`` loads both.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

CLASSIFIER_WEIGHTS = "model.safetensors"
CLASSIFIER_CONFIG = "classifier.json"
#: ``format`` value of ``classifier.json``; a loader refuses other formats.
CLASSIFIER_FORMAT = "fleet-classifier/1"


class MLP(nn.Module):
    """Three linear layers with ReLU between them; returns class logits."""

    def __init__(self, in_features: int, hidden_sizes: Sequence[int], num_classes: int) -> None:
        super().__init__()
        first, second = hidden_sizes
        self.layers = nn.Sequential(
            nn.Linear(in_features, first), nn.ReLU(),
            nn.Linear(first, second), nn.ReLU(),
            nn.Linear(second, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class BasicBlock(nn.Module):
    """ResNet's basic residual block: two 3x3 conv-BN layers plus a (projected) shortcut."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False), nn.BatchNorm2d(out_channels)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class ResNetCNN(nn.Module):
    """ResNet-18 layout (a 3x3 stem, four stages of ``blocks_per_stage`` basic blocks, the
    last three halving the resolution, global average pooling, one linear layer) with
    widths sized for 8x8 inputs: 8x8 -> 8x8 -> 4x4 -> 2x2 -> 1x1. Returns class logits."""

    def __init__(self, in_channels: int, widths: Sequence[int], blocks_per_stage: int, num_classes: int) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU()
        )
        blocks: list[nn.Module] = []
        channels = widths[0]
        for stage, width in enumerate(widths):
            for index in range(blocks_per_stage):
                stride = 2 if stage > 0 and index == 0 else 1
                blocks.append(BasicBlock(channels, width, stride))
                channels = width
        self.stages = nn.Sequential(*blocks)
        self.head = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.stages(self.stem(x))
        return self.head(features.mean(dim=(2, 3)))


_ARCHITECTURES: dict[str, type[nn.Module]] = {"mlp": MLP, "cnn": ResNetCNN}

#: Constructor arguments and input shape of each classifier architecture on 8x8 digits.
_DIGITS_CLASSIFIERS: dict[str, tuple[dict[str, Any], list[int]]] = {
    "mlp": ({"in_features": 64, "hidden_sizes": [256, 256]}, [64]),
    "cnn": ({"in_channels": 1, "widths": [16, 32, 64, 128], "blocks_per_stage": 2}, [1, 8, 8]),
}


def digits_classifier_config(architecture: str, labels: Sequence[str]) -> dict[str, Any]:
    """The ``classifier.json`` content for an ``architecture`` (``mlp`` or ``cnn``) on the digits.

    Keys: ``format``, ``architecture``, ``params`` (constructor arguments), ``input_shape``
    (of one sample), ``input_range`` (inputs are pixel intensities scaled to it), ``labels``
    (class names, index = class id).
    """
    params, input_shape = _DIGITS_CLASSIFIERS[architecture]
    return {
        "format": CLASSIFIER_FORMAT,
        "architecture": architecture,
        "params": params,
        "input_shape": input_shape,
        "input_range": [0.0, 1.0],
        "labels": list(labels),
    }


def build_classifier(config: dict[str, Any]) -> nn.Module:
    """A freshly initialised classifier (global torch RNG) described by ``config``."""
    return _ARCHITECTURES[config["architecture"]](**config["params"], num_classes=len(config["labels"]))


def save_classifier(module: nn.Module, config: dict[str, Any], directory: Path) -> None:
    """Write ``module``'s weights (safetensors) and ``config`` (JSON) into ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    state = {name: tensor.detach().cpu().contiguous() for name, tensor in module.state_dict().items()}
    save_file(state, str(directory / CLASSIFIER_WEIGHTS), metadata={"format": CLASSIFIER_FORMAT})
    (directory / CLASSIFIER_CONFIG).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


def load_classifier(directory: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, list[str]]:
    """Load a classifier saved by ``save_classifier``: the module in eval mode on ``device``
    and its label names (index = class id). Raises ``ValueError`` for another format."""
    directory = Path(directory)
    config = json.loads((directory / CLASSIFIER_CONFIG).read_text(encoding="utf-8"))
    if config.get("format") != CLASSIFIER_FORMAT:
        raise ValueError(f"{directory} holds format {config.get('format')!r}, expected {CLASSIFIER_FORMAT!r}")
    module = build_classifier(config)
    module.load_state_dict(load_file(str(directory / CLASSIFIER_WEIGHTS), device=str(device)))
    return module.to(device).eval(), list(config["labels"])


#: Shape of the tiny Llama. Positions use RoPE, so ``max_position_embeddings`` only bounds
#: generation length; training blocks are ``LM_BLOCK_SIZE`` tokens.
LM_BLOCK_SIZE = 128
_TINY_LLAMA = {
    "hidden_size": 128,
    "intermediate_size": 512,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "max_position_embeddings": 1024,
    "tie_word_embeddings": True,
}


def build_tiny_llama(tokenizer: PreTrainedTokenizerFast) -> LlamaForCausalLM:
    """A freshly initialised (global torch RNG) tiny Llama over ``tokenizer``'s vocabulary."""
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **_TINY_LLAMA,
    )
    return LlamaForCausalLM(config)
