"""A sequence's text, built token by token, handed out only in pieces nothing can take back.

``TextStream`` decodes incrementally: each token re-decodes only a short window of recent
tokens (the prefix/read offsets of vLLM's and TGI's detokenizers), so a token costs the same
at position 5 and at position 500. It cuts the text at the first stop string, and
``take_piece`` hands out only text that is final: an incomplete UTF-8 character, or a tail
that could still grow into a stop string, is held back until a later token settles it or the
sequence ends. So the pieces, concatenated, are exactly ``text`` (the job's result) at every
end: a stop string never shows in a stream whose result then cuts it.

Stop rule: generation ends as soon as the text contains one of the stop strings; the text
ends right before it. Matching is incremental (Knuth-Morris-Pratt, one automaton per stop
string), so a token costs time proportional to its characters, whatever the stops' lengths.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

#: What decoding a run of incomplete UTF-8 bytes yields (``errors="replace"``).
REPLACEMENT_CHARACTER = "\ufffd"


class _StopMatcher:
    """The longest prefix of ``stop`` that ends the text fed so far (0 if none)."""

    def __init__(self, stop: str):
        self.stop = stop
        self.matched = 0
        # failure[i]: length of the longest proper border of stop[:i + 1] (KMP prefix function).
        self._failure = [0] * len(stop)
        border = 0
        for i in range(1, len(stop)):
            while border and stop[i] != stop[border]:
                border = self._failure[border - 1]
            if stop[i] == stop[border]:
                border += 1
            self._failure[i] = border

    def feed(self, char: str) -> bool:
        """Advance by one character; True when the text now ends with the whole stop string."""
        while self.matched and char != self.stop[self.matched]:
            self.matched = self._failure[self.matched - 1]
        if char == self.stop[self.matched]:
            self.matched += 1
        return self.matched == len(self.stop)


class TextStream:
    """The text of one generated sequence. ``decode(ids)`` turns token ids into text."""

    def __init__(self, decode: Callable[[list[int]], str], stops: Sequence[str] = ()):
        self._decode = decode
        self._matchers = [_StopMatcher(stop) for stop in stops if stop]
        self._ids: list[int] = []
        self._prefix_offset = 0  # start of the decoding window (context for the next token's text)
        self._read_offset = 0  # tokens before it are in ``text``
        self._published = 0  # characters of ``text`` already handed out
        self._ended = False
        self.text = ""
        #: True once a stop string appeared; ``text`` then ends right before it.
        self.stopped = False

    def add(self, token_id: int) -> None:
        """Append one generated token (ignored once ``stopped``)."""
        if self.stopped:
            return
        self._ids.append(token_id)
        window = self._decode(self._ids[self._prefix_offset:])
        if window.endswith(REPLACEMENT_CHARACTER):
            return  # an incomplete UTF-8 character: wait for the token that completes it
        self._settle(window)

    def end(self) -> None:
        """The sequence ended (length, end of sequence): settle what is still undecoded, even an
        incomplete character (it stays U+FFFD), and release every held-back character."""
        if not self.stopped and self._read_offset < len(self._ids):
            self._settle(self._decode(self._ids[self._prefix_offset:]))
        self._ended = True

    @property
    def streamed(self) -> str:
        """The text handed out by ``take_piece`` so far."""
        return self.text[:self._published]

    def take_piece(self) -> str:
        """The text that became final since the last call ('' if none)."""
        end = len(self.text) if self.stopped or self._ended else len(self.text) - self._held_back()
        piece = self.text[self._published:end]
        self._published = max(self._published, end)
        return piece

    def _settle(self, window: str) -> None:
        settled = self._decode(self._ids[self._prefix_offset:self._read_offset])
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        self._append(window[len(settled):])

    def _append(self, new_text: str) -> None:
        start = len(self.text)
        for offset, char in enumerate(new_text):
            found = [matcher.stop for matcher in self._matchers if matcher.feed(char)]
            if found:
                end = start + offset + 1
                self.text = (self.text + new_text[:offset + 1])[:end - max(map(len, found))]
                self.stopped = True
                return
        self.text += new_text

    def _held_back(self) -> int:
        """How many trailing characters could still be the start of a stop string."""
        return max((matcher.matched for matcher in self._matchers), default=0)
