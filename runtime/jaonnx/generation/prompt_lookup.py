"""Prompt lookup: n-gram speculation, exact for greedy decoding (as transformers'
`prompt_lookup_num_tokens`).

A draft is the tokens that followed the latest earlier occurrence of the sequence's last
n-gram; the engine verifies the whole draft in one forward and keeps the tokens the model
itself would pick, so the output equals plain decoding with fewer forwards, up to the last
bits: the multi-token forward takes another attention path than one-token decoding (~1e-6 in
fp32), which int8/int4 activation rounding can amplify at a near tie (README, generation).
"""

from __future__ import annotations

import numpy as np

from .sampling import SamplingSettings, next_tokens

NGRAMS = (3, 2, 1)


def draft(context: list[int], limit: int) -> list[int]:
    """Up to `limit` tokens that followed the latest earlier occurrence of `context`'s last
    n-gram (n = 3, 2, 1, longest first)."""
    if limit <= 0:
        return []
    for n in NGRAMS:
        if len(context) <= n:
            continue
        tail = context[-n:]
        for start in range(len(context) - n - 1, -1, -1):
            if context[start : start + n] == tail:
                follow = context[start + n : start + n + limit]
                if follow:
                    return follow
    return []


def verify(
    block: np.ndarray, drafted: list[int], history: list[int], steps: int, settings: SamplingSettings,
    rng: np.random.Generator,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Check a drafted block verified in one forward (`block`: logits [1 + drafted, vocab]):
    the (token, logits) pairs kept: the drafted tokens the model itself picks, plus the
    model's own token after the last one kept. The caller drops the other positions."""
    accepted: list[tuple[np.ndarray, np.ndarray]] = []
    for j in range(len(drafted) + 1):
        logits = block[j : j + 1]
        token = next_tokens(logits, [history], steps + j, settings, rng)
        accepted.append((token, logits))
        history = history + [int(token[0])]
        if j == len(drafted) or int(token[0]) != drafted[j] or int(token[0]) == settings.eos_token_id:
            break
    return accepted
