"""Training data: the digits split, the fables corpus and its tokenizer."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from workers.training import data


def test_digits_split_is_stratified_deterministic_disjoint_and_scaled() -> None:
    split = data.load_digits_split(seed=0, eval_fraction=0.2, input_shape=(64,))
    assert split.train_x.shape == (1437, 64) and split.eval_x.shape == (360, 64)
    assert split.train_x.dtype == torch.float32 and split.train_y.dtype == torch.int64
    assert 0.0 <= float(split.train_x.min()) and float(split.train_x.max()) == 1.0
    eval_counts = Counter(split.eval_y.tolist())
    assert sorted(eval_counts) == list(range(10)) and max(eval_counts.values()) - min(eval_counts.values()) <= 2
    again = data.load_digits_split(seed=0, eval_fraction=0.2, input_shape=(64,))
    assert torch.equal(again.eval_x, split.eval_x) and torch.equal(again.train_y, split.train_y)
    other = data.load_digits_split(seed=1, eval_fraction=0.2, input_shape=(64,))
    assert not torch.equal(other.eval_x, split.eval_x)
    train_rows = {tuple(row) for row in split.train_x.tolist()}
    duplicates_in_eval = sum(tuple(row) in train_rows for row in split.eval_x.tolist())
    assert duplicates_in_eval <= 2  # the dataset itself holds a handful of identical images
    assert data.DIGIT_LABELS == tuple("0123456789")


def test_digits_come_as_images_for_the_cnn() -> None:
    flat = data.load_digits_split(seed=3, eval_fraction=0.25, input_shape=(64,))
    images = data.load_digits_split(seed=3, eval_fraction=0.25, input_shape=(1, 8, 8))
    assert images.train_x.shape[1:] == (1, 8, 8)
    assert torch.equal(images.eval_x.reshape(-1, 64), flat.eval_x)


def test_the_corpus_is_a_public_domain_text_of_the_documented_size() -> None:
    text = data.CORPUS_PATH.read_text(encoding="utf-8")
    assert 30_000 <= len(text.encode()) <= 64_000 and text.isascii()
    fables = data.load_fables()
    assert len(fables) >= 80
    assert all(len(fable.split("\n")) == 2 for fable in fables)  # title line + text line
    assert fables[0].startswith("The Wolf and the Lamb\n")
    readme = (data.CORPUS_PATH.parent / "README.md").read_text(encoding="utf-8")
    assert "Townsend" in readme and "public domain" in readme


def test_fables_split_holds_out_whole_fables_by_seed() -> None:
    fables = data.load_fables()
    train, held_out = data.split_fables(fables, seed=0, eval_fraction=0.2)
    assert len(held_out) == round(0.2 * len(fables)) and len(train) + len(held_out) == len(fables)
    assert not set(train) & set(held_out)
    assert data.split_fables(fables, seed=0, eval_fraction=0.2) == (train, held_out)
    assert data.split_fables(fables, seed=1, eval_fraction=0.2)[1] != held_out


def test_tokenizer_is_byte_level_bpe_with_special_tokens_and_round_trips(tmp_path: Path) -> None:
    train, _ = data.split_fables(data.load_fables(), seed=0, eval_fraction=0.2)
    tokenizer = data.train_tokenizer(train, vocab_size=320)
    assert len(tokenizer) == 320
    assert (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 1, 2)
    text = "The Fox ate \u00e9clairs, said the Crow."  # a byte outside the corpus still encodes
    ids = tokenizer(text).input_ids
    assert ids[0] == tokenizer.bos_token_id and len(ids) < len(text.encode())  # merges shorten it
    assert tokenizer.decode(ids, skip_special_tokens=True) == text
    assert data.train_tokenizer(train, vocab_size=320).get_vocab() == tokenizer.get_vocab()

    tokenizer.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    assert reloaded(text).input_ids == ids
    assert (reloaded.bos_token, reloaded.eos_token, reloaded.pad_token) == ("<s>", "</s>", "<pad>")


def test_token_blocks_frame_each_text_and_cut_whole_blocks() -> None:
    tokenizer = data.train_tokenizer(data.load_fables()[:20], vocab_size=300)
    texts = ["The Ant and the Dove", "A Lion was awakened from sleep by a Mouse."]
    blocks = data.token_blocks(tokenizer, texts, block_size=4)
    stream = []
    for text in texts:
        stream += [1, *tokenizer.encode(text, add_special_tokens=False), 2]
    assert blocks.dtype == torch.int64 and blocks.shape == (len(stream) // 4, 4)
    assert blocks.flatten().tolist() == stream[: blocks.numel()]
    with pytest.raises(ValueError, match="do not fill one block"):
        data.token_blocks(tokenizer, ["Ant"], block_size=64)
