"""Models for benchmarks and GPU tests that need no hub: random-weight BERTs with a generated tokenizer.

A BERT-base with random weights (``BertConfig()``) costs the same FLOPs as a trained one, so it
stands in for GPU speed figures. Its tokenizer is a WordPiece tokenizer over a generated
vocabulary of made-up lowercase words, each of which is one token; ``sentence(n)`` builds a
text of exactly ``n`` tokens (plus [CLS] and [SEP]).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
LETTERS = "abcdefghijklmnopqrstuvwxyz"


def made_up_words(count: int) -> list[str]:
    """``count`` distinct lowercase words ("ba", "bb", ..., "baa", ...), deterministic."""
    words: list[str] = []
    length = 2
    while len(words) < count:
        for index in range(len(LETTERS) ** length):
            word, n = [], index
            for _ in range(length):
                n, digit = divmod(n, len(LETTERS))
                word.append(LETTERS[digit])
            words.append("".join(reversed(word)))
            if len(words) == count:
                break
        length += 1
    return words


def build_random_bert(directory: Path | str, *, seed: int = 0, max_position_embeddings: int = 512,
                      **config_overrides) -> Path:
    """Write ``BertConfig(**config_overrides)`` with random weights plus a matching tokenizer to ``directory``.

    The defaults are BERT-base (12 layers, hidden 768, vocab 30522). Returns the directory,
    loadable with ``AutoModel.from_pretrained`` / ``AutoTokenizer.from_pretrained``.
    """
    import torch
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = BertConfig(max_position_embeddings=max_position_embeddings, **config_overrides)
    vocab_words = SPECIAL + made_up_words(config.vocab_size - len(SPECIAL))
    vocab = {word: index for index, word in enumerate(vocab_words)}
    tokenizer = Tokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
    tokenizer.decoder = decoders.WordPiece()
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]", pad_token="[PAD]",
                                   cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]",
                                   model_max_length=max_position_embeddings)
    fast.save_pretrained(directory)
    torch.manual_seed(seed)
    model = BertModel(config).eval()
    model.save_pretrained(directory)
    (directory / "fleet-bench.json").write_text(json.dumps({"words": len(vocab_words) - len(SPECIAL)}))
    return directory


class SentenceMaker:
    """Texts of a chosen token length over the made-up vocabulary of ``build_random_bert``."""

    def __init__(self, vocab_size: int = 30522, seed: int = 0):
        self.words = made_up_words(min(vocab_size - len(SPECIAL), 5000))
        self.random = random.Random(seed)

    def sentence(self, tokens: int) -> str:
        """A text of exactly ``tokens`` word tokens (the tokenizer adds [CLS] and [SEP])."""
        return " ".join(self.random.choice(self.words) for _ in range(tokens))
