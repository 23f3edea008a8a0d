"""Incremental detokenization: the text each new token adds, in O(window) per token.

Decoding the whole prompt + continuation every step costs more than a decode step itself on a
small model, so, as vLLM does, each step decodes only a short window: the few tokens before
the last finished text and the tokens after it. The pieces always join to what decoding the
prompt and continuation together gives after the prompt's own text.
"""

from __future__ import annotations

from collections.abc import Callable

REPLACEMENT = "\ufffd"  # an incomplete byte-fallback character decodes to this
CONTEXT = 4  # tokens of finished text kept in front of the window (sentencepiece drops a
# leading space only at the very start of a text, so the window must not start at the new text)


class IncrementalText:
    """Feed token ids; `push` returns the text they finish, holding back an incomplete character."""

    def __init__(self, decode: Callable[[list[int]], str], prompt_ids: list[int]) -> None:
        self._decode = decode
        self._ids = list(prompt_ids)
        self._read = len(self._ids)  # tokens whose text is final
        self._start = max(0, self._read - CONTEXT)  # window start
        self.text = ""  # the continuation's text so far

    def push(self, token_ids: list[int]) -> str:
        self._ids.extend(token_ids)
        piece = self._pending()
        if piece.endswith(REPLACEMENT):
            return ""  # wait for the character's other bytes
        return self._take(piece)

    def finish(self) -> str:
        """Whatever is left, incomplete characters included."""
        return self._take(self._pending())

    def _pending(self) -> str:
        """Text of the tokens after the finished text, decoded in context: the short window
        first, the whole sequence if the window's text is empty or not a prefix."""
        for start in (self._start, 0):
            head = self._decode(self._ids[start : self._read])
            full = self._decode(self._ids[start:])
            if (head or start == 0) and full.startswith(head):
                return full[len(head) :]
        return self._decode(self._ids[self._read :])  # not seen with sentencepiece; keeps the text whole

    def _take(self, piece: str) -> str:
        self._read = len(self._ids)
        self._start = max(0, self._read - CONTEXT)
        self.text += piece
        return piece
