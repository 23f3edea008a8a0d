"""The recipe's tokenization rules on top of a backend: normalization, layout, typed masks."""

from __future__ import annotations

from pathlib import Path

from ..errors import JaonnxError
from ..recipes import Recipe
from .backends import Backend, load_backend
from .normalize import normalize


def check_text(text: str) -> str:
    """Text the tokenizers can take: a str of valid Unicode (no lone surrogates)."""
    if not isinstance(text, str):
        raise JaonnxError(f"expected a text (str), got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise JaonnxError(
            f"text has a lone surrogate {text[exc.start]!r} at index {exc.start}: pass valid Unicode text"
        ) from None
    return text


class RecipeTokenizer:
    """Encodes exactly as the model card does, with no transformers involved."""

    def __init__(self, recipe: Recipe, backend: Backend, special_ids: dict[str, int]) -> None:
        self.recipe = recipe
        self.backend = backend
        self.special_ids = dict(special_ids)
        self._special_set = set(self.special_ids.values())
        self.mask_token = recipe.special.mask
        self.mask_id = self.special_ids.get("mask")

    @classmethod
    def from_file(cls, recipe: Recipe, path: Path, special_ids: dict[str, int]) -> RecipeTokenizer:
        return cls(recipe, load_backend(recipe.tokenizer_backend, Path(path)), special_ids)

    def _strip_typed(self, text: str) -> str:
        for role in self.recipe.strip_typed:
            token = getattr(self.recipe.special, role)
            stripped = text.lstrip()
            if token and stripped.startswith(token):
                text = stripped[len(token) :]
        return text

    def encode_text(self, text: str) -> list[int]:
        """A plain text (a prompt): normalized, no special tokens (add_special_tokens=False)."""
        return self.backend.encode(normalize(check_text(text), self.recipe.normalizers))

    def encode_masked(self, text: str) -> list[int]:
        """`[CLS] … [SEP]`-style ids where each typed mask is a mask *after* tokenization.

        The text before the first mask is encoded as the start of a text, every text after a
        mask as its continuation (no dummy-prefix `▁`), so no spurious token follows a mask.
        """
        if self.mask_token is None or self.mask_id is None:
            raise JaonnxError(f"recipe {self.recipe.id} has no mask token: it is not a fill-mask model")
        segments = self._strip_typed(check_text(text)).split(self.mask_token)
        ids = [self.special_ids[role] for role in self.recipe.prefix]
        for i, segment in enumerate(segments):
            if i:
                ids.append(self.mask_id)
            segment = normalize(segment, self.recipe.normalizers)
            if segment.strip():
                ids.extend(self.backend.encode(segment, continuation=i > 0))
        ids.extend(self.special_ids[role] for role in self.recipe.suffix)
        return ids

    def decode(self, ids: list[int], *, keep: tuple[int, ...] = ()) -> str:
        """Text of `ids`, special tokens dropped except those in `keep`."""
        self._check_ids(ids)
        return self.backend.decode([i for i in ids if i not in self._special_set or i in keep])

    def token_str(self, token_id: int) -> str:
        self._check_ids([token_id])
        return self.backend.decode([token_id])

    def _check_ids(self, ids: list[int]) -> None:
        """sentencepiece raises IndexError past its vocabulary; say which id instead."""
        size = self.backend.vocab_size
        bad = next((i for i in ids if not 0 <= int(i) < size), None)
        if bad is not None:
            raise JaonnxError(f"token id {bad} is outside the tokenizer's vocabulary (0..{size - 1})")

    @property
    def vocab_size(self) -> int:
        return self.backend.vocab_size
