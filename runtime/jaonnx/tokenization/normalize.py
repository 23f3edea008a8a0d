"""Text normalizers a recipe can ask for, applied before the tokenizer sees the text."""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable

_HALFWIDTH_KANA = re.compile("[\uff61-\uff9f]+")
# ASCII '!'..'~' map to U+FF01..U+FF5E; a space becomes the ideographic space.
_TO_FULLWIDTH = {c: c + 0xFEE0 for c in range(0x21, 0x7F)} | {0x20: 0x3000}


def to_fullwidth(text: str) -> str:
    """全角 conversion as JMedRoBERTa's card asks: ASCII and half-width katakana to full width."""
    text = _HALFWIDTH_KANA.sub(lambda m: unicodedata.normalize("NFKC", m.group()), text)
    return text.translate(_TO_FULLWIDTH)


NORMALIZERS: dict[str, Callable[[str], str]] = {
    "lowercase": str.lower,
    "fullwidth": to_fullwidth,
}


def normalize(text: str, names: tuple[str, ...]) -> str:
    for name in names:
        text = NORMALIZERS[name](text)
    return text
