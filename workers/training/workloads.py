"""What the training loop trains: one model, its data on the device, its loss, its evaluation
and how to save it. One ``Workload`` per kind; the loop itself knows none of them.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path

import torch
import torch.nn.functional as F  # noqa: N812 - PyTorch's conventional name
from torch import nn
from transformers import LlamaForCausalLM
from transformers.utils import logging as hf_logging

from producer.contract.training import TrainKind, TrainRequest
from workers.training import data, models

#: Samples per forward pass during evaluation (bounds its memory, not its result).
_EVAL_BATCH = 256
#: Vocabulary of the corpus tokenizer: 3 special tokens, the 256 byte symbols and 41 merges.
#: Kept near byte level: on 60 KB of text, longer tokens are seen too rarely to generalise
#: to held-out fables (at 512 the held-out loss bottomed out at 0.61 of its start value;
#: at 300 it reaches 0.44-0.46 with the default settings).
LM_VOCAB_SIZE = 300


class Workload(ABC):
    """A model (in train mode, on its device) with ``n_train`` training samples."""

    model: nn.Module
    n_train: int

    @abstractmethod
    def loss_sum(self, indices: torch.Tensor) -> torch.Tensor:
        """The training loss of the samples at ``indices`` (on the model's device): the sum
        over those samples of each one's mean cross-entropy in nats, a scalar with grad."""

    @abstractmethod
    def evaluate(self) -> dict[str, float]:
        """Metrics of the current model on the held-out split: always ``val_loss`` (mean
        cross-entropy per sample, or per predicted token for the LM). Leaves train mode on."""

    @abstractmethod
    def save(self, directory: Path) -> None:
        """Write the model into the empty ``directory`` in its loadable format."""


class ClassifierWorkload(Workload):
    """An ``mlp`` or ``cnn`` digits classifier; also reports ``accuracy`` (0..1)."""

    def __init__(self, architecture: str, seed: int, eval_fraction: float, device: torch.device) -> None:
        self.config = models.digits_classifier_config(architecture, data.DIGIT_LABELS)
        split = data.load_digits_split(seed, eval_fraction, tuple(self.config["input_shape"]))
        self.model = models.build_classifier(self.config).to(device)
        self.train_x, self.train_y = split.train_x.to(device), split.train_y.to(device)
        self.eval_x, self.eval_y = split.eval_x.to(device), split.eval_y.to(device)
        self.n_train = len(self.train_y)

    def loss_sum(self, indices: torch.Tensor) -> torch.Tensor:
        logits = self.model(self.train_x[indices])
        return F.cross_entropy(logits.float(), self.train_y[indices], reduction="sum")

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        self.model.eval()
        loss, correct = 0.0, 0
        for x, y in zip(self.eval_x.split(_EVAL_BATCH), self.eval_y.split(_EVAL_BATCH)):
            logits = self.model(x).float()
            loss += F.cross_entropy(logits, y, reduction="sum").item()
            correct += int((logits.argmax(dim=1) == y).sum().item())
        self.model.train()
        n = len(self.eval_y)
        return {"val_loss": loss / n, "accuracy": correct / n}

    def save(self, directory: Path) -> None:
        models.save_classifier(self.model, self.config, directory)


class LanguageModelWorkload(Workload):
    """A tiny Llama on the fables; a sample is one block of ``LM_BLOCK_SIZE`` tokens.

    The tokenizer is trained on the training fables only, so nothing of the held-out
    fables reaches the model.
    """

    model: LlamaForCausalLM

    def __init__(self, seed: int, eval_fraction: float, device: torch.device) -> None:
        train_texts, eval_texts = data.split_fables(data.load_fables(), seed, eval_fraction)
        self.tokenizer = data.train_tokenizer(train_texts, LM_VOCAB_SIZE)
        self.model = models.build_tiny_llama(self.tokenizer).to(device)
        self.train_blocks = data.token_blocks(self.tokenizer, train_texts, models.LM_BLOCK_SIZE).to(device)
        self.eval_blocks = data.token_blocks(self.tokenizer, eval_texts, models.LM_BLOCK_SIZE).to(device)
        self.n_train = len(self.train_blocks)

    def _block_loss_sum(self, blocks: torch.Tensor) -> torch.Tensor:
        logits = self.model(input_ids=blocks, use_cache=False).logits[:, :-1].float()
        targets = blocks[:, 1:]
        token_loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum")
        return token_loss / targets.shape[1]

    def loss_sum(self, indices: torch.Tensor) -> torch.Tensor:
        return self._block_loss_sum(self.train_blocks[indices])

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        self.model.eval()
        loss = sum(self._block_loss_sum(blocks).item() for blocks in self.eval_blocks.split(_EVAL_BATCH))
        self.model.train()
        return {"val_loss": loss / len(self.eval_blocks)}

    def save(self, directory: Path) -> None:
        quiet = not hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()  # no tqdm bar in worker logs
        try:
            self.model.save_pretrained(directory)
        finally:
            if not quiet:
                hf_logging.enable_progress_bar()
        self.tokenizer.save_pretrained(directory)


def build_workload(request: TrainRequest, device: torch.device) -> Workload:
    """Load the data and initialise the model of ``request`` on ``device``.

    Initialisation draws from the global CPU RNG seeded with ``request.seed`` inside
    ``fork_rng``, so it is reproducible and leaves the caller's RNG state untouched.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(request.seed)
        if request.kind is TrainKind.CAUSAL_LM:
            return LanguageModelWorkload(request.seed, request.eval_fraction, device)
        return ClassifierWorkload(request.kind.value, request.seed, request.eval_fraction, device)
