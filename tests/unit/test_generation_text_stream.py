"""TextStream: pieces a stop string can never take back, incomplete UTF-8 held back, and pieces that
add up to the text, with a byte-level toy decoder and with the demo's real tokenizer."""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from workers.serving.generation.text_stream import TextStream


def byte_decoder(ids: list[int]) -> str:
    """Token i is byte i: decoding is UTF-8 with replacement, like a byte-level BPE tokenizer's."""
    return bytes(ids).decode("utf-8", errors="replace")


def feed(text_bytes: bytes, stops=(), until_stop=True) -> tuple[TextStream, list[str]]:
    stream, pieces = TextStream(byte_decoder, stops), []
    for byte in text_bytes:
        stream.add(byte)
        pieces.append(stream.take_piece())
        if stream.stopped and until_stop:
            break
    stream.end()
    pieces.append(stream.take_piece())
    return stream, pieces


def test_a_prefix_of_a_stop_string_is_held_back_until_it_is_settled():
    stream = TextStream(byte_decoder, ["L8"])
    emitted = []
    for char in "abcL7dL8ef":
        stream.add(ord(char))
        emitted.append(stream.take_piece())
        if stream.stopped:
            break
    assert emitted == ["a", "b", "c", "", "L7", "d", "", ""]  # "L" waits; "L7" goes once "7" settles it
    assert stream.stopped and stream.text == "abcL7d"
    assert "".join(emitted) == stream.text


def test_the_earliest_complete_stop_string_ends_the_text():
    stream, pieces = feed(b"one two three", stops=("three", "two t"))
    assert stream.text == "one " and "".join(pieces) == "one "


def test_an_incomplete_utf8_character_is_held_back_then_released_whole():
    stream = TextStream(byte_decoder)
    pieces = []
    for byte in "é!".encode():
        stream.add(byte)
        pieces.append(stream.take_piece())
    assert pieces == ["", "é", "!"]


def test_an_unfinished_character_at_the_end_is_released_as_a_replacement():
    stream, pieces = feed("ok€".encode()[:-1])
    assert stream.text == "ok\ufffd" and "".join(pieces) == stream.text


def test_a_long_stop_string_costs_no_more_than_its_characters():
    stop = "x" * 8192  # the contract's longest stop string
    stream, pieces = feed(b"x" * 8191 + b"y", stops=(stop,))
    assert not stream.stopped and "".join(pieces) == "x" * 8191 + "y"


@given(st.binary(max_size=60), st.lists(st.text(alphabet="ab\u00e9L8", min_size=1, max_size=4), max_size=3))
def test_pieces_always_add_up_to_the_text_and_never_contain_a_stop_string(data, stops):
    stream, pieces = feed(data, stops)
    assert "".join(pieces) == stream.text
    full = byte_decoder(list(data))
    assert full.startswith(stream.text)
    assert not any(stop in stream.text for stop in stops)
    if stream.stopped:
        assert any(full[len(stream.text):].startswith(stop) for stop in stops)


@pytest.fixture(scope="module")
def fable_tokenizer():
    from workers.training.data import load_fables, train_tokenizer
    from workers.training.workloads import LM_VOCAB_SIZE

    return train_tokenizer(load_fables(), LM_VOCAB_SIZE)


def test_windowed_decoding_equals_decoding_everything_with_the_real_tokenizer(fable_tokenizer):
    def decode(ids):
        return fable_tokenizer.decode(ids, skip_special_tokens=True)

    rng = random.Random(0)
    special = set(fable_tokenizer.all_special_ids)
    for _ in range(50):
        ids = [token for token in (rng.randrange(len(fable_tokenizer)) for _ in range(60)) if token not in special]
        stream, pieces = TextStream(decode), []
        for token in ids:
            stream.add(token)
            pieces.append(stream.take_piece())
        stream.end()
        pieces.append(stream.take_piece())
        assert "".join(pieces) == stream.text == decode(ids)
