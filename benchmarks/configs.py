"""Model shapes measured: the real configurations with random weights (or twin-sized for smoke runs)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Shape:
    key: str
    recipe: str  # twin whose tokenizer and special ids are reused
    architecture: str
    config: dict[str, Any] = field(default_factory=dict)


REAL = {
    "bert-base": Shape("bert-base", "jmedroberta", "BertForMaskedLM", dict(
        vocab_size=32000, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
        intermediate_size=3072, max_position_embeddings=512)),
    "gpt2-small": Shape("gpt2-small", "gpt2-small-ja", "GPT2LMHeadModel", dict(
        vocab_size=32000, n_embd=768, n_layer=12, n_head=12, n_inner=None, n_positions=1024)),
    "gpt-1b": Shape("gpt-1b", "rinna-gpt-1b", "GPT2LMHeadModel", dict(
        vocab_size=44928, n_embd=2048, n_layer=24, n_head=16, n_inner=8192, n_positions=2048)),
}

TINY = {
    "bert-base": Shape("bert-base", "jmedroberta", "BertForMaskedLM", dict(
        vocab_size=3000, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=128, max_position_embeddings=512)),
    "gpt2-small": Shape("gpt2-small", "gpt2-small-ja", "GPT2LMHeadModel", dict(
        vocab_size=3000, n_embd=64, n_layer=2, n_head=4, n_inner=None, n_positions=1024)),
    "gpt-1b": Shape("gpt-1b", "rinna-gpt-1b", "GPT2LMHeadModel", dict(
        vocab_size=3000, n_embd=64, n_layer=4, n_head=16, n_inner=256, n_positions=1024)),
}
