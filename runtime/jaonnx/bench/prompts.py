"""Prompts of an exact token count for measurements, in any recipe's tokenizer.

Its own module so that `jaonnx bench` (artifact.py) and the fresh process that measures peak
RSS (rss.py) both read it without importing each other."""

from __future__ import annotations

from collections.abc import Callable

# Filler text: prompts of an exact token count are prefixes of it (any recipe's tokenizer).
TEXT = ("近年の機械学習は大規模なデータと計算資源によって急速に発展している。自然言語処理の分野では、"
        "事前学習された言語モデルが翻訳や要約、質問応答など多くの課題で高い性能を示した。一方で、"
        "推論に必要なメモリと計算量は増え続けており、手元の計算機で速く動かす工夫が求められている。")


def prefix_with_tokens(count: Callable[[str], int], tokens: int, head: str = "") -> str:
    """The longest `head` + prefix of the filler whose encoding has at most `tokens` tokens."""
    long = TEXT * (tokens // 20 + 2)
    lo, hi = 1, len(long)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if count(head + long[:mid]) <= tokens:
            lo = mid
        else:
            hi = mid - 1
    return head + long[:lo]
