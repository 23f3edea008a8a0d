"""A model's vocabulary as the bytes each token adds to the text, for grammar-constrained decoding.

A constraint library (llguidance) matches bytes, not pieces, so every token id needs the bytes
it contributes to the decoded text: `▁` is a space, a byte-fallback piece `<0xNN>` is that one
byte, and control, unknown and special tokens have none (they are never allowed inside a
constrained span; EOS is handled apart, where the constraint allows the end).

The library also tokenizes text it is certain must come next (forced bytes). That encoding must
be a *continuation* encoding, with no sentencepiece dummy prefix and no normalization, and its
tokens' bytes must join to exactly the text: with the prefix, llguidance 1.9.1 on the real rinna
vocabulary allowed only `▁` at the first JSON step and then rejected it.

A vocabulary without byte fallback cannot spell every byte string, and llguidance assumes it
can (a forced partial UTF-8 character tokenizes to nothing and the mask comes out empty). So
such a vocabulary gets 256 *virtual* byte tokens past its end: the library can always tokenize,
and the model can never produce them (their ids are outside its logits). A step at which only
virtual tokens fit is a text the vocabulary cannot spell: the engine reports it as an error
instead of ending silently in invalid output.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from .backends import Backend


@dataclass(frozen=True)
class TokenVocabulary:
    """`tokens[i]`: the bytes token i adds (a placeholder for special ids, listed in
    `special_ids`); ids from `size` on are virtual byte tokens (`virtual` of them)."""

    tokens: list[bytes]
    special_ids: tuple[int, ...]
    eos_id: int
    size: int  # the real tokens
    virtual: int = 0
    _index: dict[bytes, int] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_backend(cls, backend: Backend, special_ids: Iterable[int], eos_id: int | None) -> TokenVocabulary:
        """The vocabulary of `backend`, with the model's special ids (`special_ids`) never
        produced inside a constraint and `eos_id` allowed where the constraint can end."""
        size = backend.vocab_size
        special = set(int(i) for i in special_ids if 0 <= int(i) < size)
        tokens: list[bytes] = []
        for i in range(size):
            data = None if i in special else backend.token_bytes(i)
            if data is None or data == b"":
                special.add(i)
                data = f"<[{i}]>".encode()  # the library marks special ids itself; any name will do
            tokens.append(data)
        single = {t for i, t in enumerate(tokens) if i not in special and len(t) == 1}
        virtual = 0 if len(single) == 256 else 256
        tokens += [bytes([b]) for b in range(virtual)]
        if eos_id is None or not 0 <= eos_id < size:
            eos_id = len(tokens)  # no end-of-text token: a virtual one the model never produces
            tokens.append(b"<[eos]>")
            special.add(eos_id)
        index: dict[bytes, int] = {}
        for i, t in enumerate(tokens):
            if i not in special and (i < size or t not in index):
                index.setdefault(t, i)
        return cls(tokens, tuple(sorted(special)), eos_id, size, virtual, index)

    def spell(self, data: bytes, encoded: list[int]) -> list[int]:
        """`encoded` if its tokens' bytes join to `data`, else a greedy longest-match spelling
        (virtual byte tokens where the vocabulary has nothing): always exactly `data`."""
        special = set(self.special_ids)
        if all(0 <= t < len(self.tokens) and t not in special for t in encoded) and b"".join(
            self.tokens[t] for t in encoded
        ) == data:
            return encoded
        longest = max(map(len, self._index), default=1)
        out, i = [], 0
        while i < len(data):  # every single byte has a token (real or virtual), so this ends
            j = next(j for j in range(min(len(data), i + longest), i, -1) if data[i:j] in self._index)
            out.append(self._index[data[i:j]])
            i = j
        return out

    def can_spell(self, data: bytes) -> bool:
        """Whether real (model-producible) tokens can spell `data` exactly."""
        reachable = [True] + [False] * len(data)
        longest = max(map(len, self._index), default=1)
        for i in range(len(data)):
            if not reachable[i]:
                continue
            for j in range(i + 1, min(len(data), i + longest) + 1):
                token = self._index.get(data[i:j])
                if token is not None and token < self.size:
                    reachable[j] = True
        return reachable[-1]
