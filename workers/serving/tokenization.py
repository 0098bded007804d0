"""Tokenising in the consumer processes, with the ``tokenizers`` library alone (no torch, no transformers).

A model directory saved by transformers holds ``tokenizer.json``: the whole fast tokenizer
(normaliser, pre-tokeniser, vocabulary, post-processor that adds [CLS]/[SEP]).
``TextEncoder`` loads that file and gives, for each text, exactly the ids that
``AutoTokenizer.from_pretrained(dir)(texts, truncation=True, max_length=n)["input_ids"]`` gives
(tests/unit/test_tokenization.py checks it), so the device process receives ready ids.
``encode_batch`` runs in Rust without the GIL, so many task threads tokenise in parallel.
"""

from __future__ import annotations

from tokenizers import Tokenizer


class TextEncoder:
    """Texts -> token ids, truncated to ``max_length`` tokens (special tokens included), unpadded."""

    def __init__(self, tokenizer_file: str, max_length: int):
        self.max_length = max_length
        self._tokenizer = Tokenizer.from_file(tokenizer_file)
        self._tokenizer.no_padding()
        self._tokenizer.enable_truncation(max_length=max_length)

    def encode(self, texts: list[str]) -> list[list[int]]:
        """One list of token ids per text, in order."""
        return [encoding.ids for encoding in self._tokenizer.encode_batch(texts, add_special_tokens=True)]
