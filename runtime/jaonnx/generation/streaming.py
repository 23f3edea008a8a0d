"""Incremental detokenization: text pieces whose concatenation is exactly the decoded text."""

from __future__ import annotations

from collections.abc import Callable

REPLACEMENT = "\ufffd"


def continuation_text(decode: Callable[[list[int]], str], prompt_ids: list[int], new_ids: list[int]) -> str:
    """The text `new_ids` add after the prompt, spaces and all (sentencepiece drops a leading
    space only at the very start of a text, so decode the two together and cut)."""
    head = decode(prompt_ids)
    full = decode(prompt_ids + new_ids)
    if full.startswith(head):
        return full[len(head) :]
    return decode(new_ids)


class StreamDecoder:
    """Feed token ids one at a time; `push` returns the text that is now final.

    Text ending in U+FFFD (an incomplete byte-fallback character) is held back until the
    character completes; `finish` returns whatever is left, so the pieces always join to
    `continuation_text(...)` of all the ids.
    """

    def __init__(self, decode: Callable[[list[int]], str], prompt_ids: list[int]) -> None:
        self._decode = decode
        self._prompt = list(prompt_ids)
        self._ids: list[int] = []
        self._emitted = ""

    def _text(self) -> str:
        return continuation_text(self._decode, self._prompt, self._ids)

    def push(self, token_id: int) -> str:
        self._ids.append(int(token_id))
        text = self._text()
        if text.endswith(REPLACEMENT) or not text.startswith(self._emitted):
            return ""
        piece, self._emitted = text[len(self._emitted) :], text
        return piece

    def finish(self) -> str:
        text = self._text()
        if text.startswith(self._emitted):
            piece = text[len(self._emitted) :]
        else:  # cannot happen with sentencepiece; keep the join exact if it ever does
            piece = text
        self._emitted = text
        return piece
