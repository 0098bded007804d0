"""Training data that needs no hub: scikit-learn's digits (the ``training`` extra) and the fables
corpus in this package.

Every split is a pure function of ``(seed, eval_fraction)``, so a resumed job sees exactly
the data it saw before the interruption.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from producer.optional import require_extra

#: The corpus: one fable per paragraph (a title line, then the text on one line),
#: paragraphs separated by one blank line. Source and licence: corpus/README.md.
CORPUS_PATH = Path(__file__).parent / "corpus" / "aesop.txt"

#: Special tokens of the corpus tokenizer, in id order (pad = 0, bos = 1, eos = 2).
PAD_TOKEN, BOS_TOKEN, EOS_TOKEN = "<pad>", "<s>", "</s>"

#: Class names of the digits dataset, index = class id.
DIGIT_LABELS: tuple[str, ...] = tuple(str(d) for d in range(10))
#: Digits pixels are integers 0..16; inputs are scaled by this to [0, 1].
DIGITS_PIXEL_MAX = 16.0


@dataclass(frozen=True)
class ImageSplit:
    """A stratified train/eval split of the digits; ``x`` is float32 in [0, 1] shaped
    ``(n, *input_shape)``, ``y`` holds int64 class ids (index into ``DIGIT_LABELS``)."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    eval_x: torch.Tensor
    eval_y: torch.Tensor


def load_digits_split(seed: int, eval_fraction: float, input_shape: tuple[int, ...]) -> ImageSplit:
    """Split the 1797 digits, stratified by class, holding out ``eval_fraction`` of them.

    ``input_shape`` is ``(64,)`` for flat vectors (MLP) or ``(1, 8, 8)`` for images (CNN).
    """
    require_extra("sklearn", extra="training", purpose="the digits data set")
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / DIGITS_PIXEL_MAX
    y = torch.tensor(digits.target, dtype=torch.int64)
    train_idx, eval_idx = train_test_split(
        torch.arange(len(y)).numpy(), test_size=eval_fraction, random_state=seed, stratify=y.numpy()
    )
    train_idx, eval_idx = torch.from_numpy(train_idx), torch.from_numpy(eval_idx)
    shape = (-1, *input_shape)
    return ImageSplit(
        train_x=x[train_idx].reshape(shape),
        train_y=y[train_idx],
        eval_x=x[eval_idx].reshape(shape),
        eval_y=y[eval_idx],
    )


def load_fables() -> list[str]:
    """The corpus as a list of fables, each ``"Title\\nText"``, in file order."""
    return CORPUS_PATH.read_text(encoding="utf-8").strip().split("\n\n")


def split_fables(fables: list[str], seed: int, eval_fraction: float) -> tuple[list[str], list[str]]:
    """Hold out ``eval_fraction`` of the fables (at least one), chosen by ``seed``."""
    order = list(range(len(fables)))
    random.Random(seed).shuffle(order)
    n_eval = max(1, round(eval_fraction * len(fables)))
    held_out = set(order[:n_eval])
    train = [f for i, f in enumerate(fables) if i not in held_out]
    return train, [fables[i] for i in sorted(held_out)]


def train_tokenizer(texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on ``texts`` (deterministic for the same texts).

    Any byte sequence stays encodable: the 256 byte symbols are always in the vocabulary,
    and merges fill the rest of ``vocab_size`` after the three special tokens. Encoding
    with special tokens (the default of ``tokenizer(text)``) prepends ``<s>``, as every
    training text began, so a prompt needs no extra handling.
    """
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD_TOKEN, BOS_TOKEN, EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A", special_tokens=[(BOS_TOKEN, tokenizer.token_to_id(BOS_TOKEN))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token=PAD_TOKEN, bos_token=BOS_TOKEN, eos_token=EOS_TOKEN
    )


def token_blocks(tokenizer: PreTrainedTokenizerFast, texts: list[str], block_size: int) -> torch.Tensor:
    """Encode each text as ``<s> text </s>``, concatenate, and cut into rows of
    ``block_size`` token ids (int64, shape ``(n_blocks, block_size)``); the tail that
    fills no whole block is dropped."""
    ids: list[int] = []
    for text in texts:
        ids.append(tokenizer.bos_token_id)
        ids.extend(tokenizer.encode(text, add_special_tokens=False))
        ids.append(tokenizer.eos_token_id)
    n_blocks = len(ids) // block_size
    if n_blocks == 0:
        raise ValueError(f"{len(ids)} tokens do not fill one block of {block_size}")
    return torch.tensor(ids[: n_blocks * block_size], dtype=torch.int64).view(n_blocks, block_size)
