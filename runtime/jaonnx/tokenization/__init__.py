"""Tokenization: sentencepiece / tokenizers backends under the recipe's rules."""

from .backends import Backend, SentencePieceBackend, TokenizersBackend, load_backend
from .encoder import RecipeTokenizer
from .normalize import normalize, to_fullwidth

__all__ = [
    "Backend",
    "RecipeTokenizer",
    "SentencePieceBackend",
    "TokenizersBackend",
    "load_backend",
    "normalize",
    "to_fullwidth",
]
