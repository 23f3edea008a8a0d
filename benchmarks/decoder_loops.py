"""Greedy loops that drive a `BatchDecoder` directly (add rows, step, keep), shared by the GPU
check (benchmarks/gpu_check.py) and the tests: one copy of each scenario, so the check that runs on
the GPU and the test that guards it on the CPU exercise the same sequence of operations."""

from __future__ import annotations

from typing import Any

import numpy as np


def greedy_rows(decoder: Any, prompts: list[list[int]], new: int, spare: int = 0) -> tuple[list[list[int]], np.ndarray]:
    """Greedy ids of every prompt (added together, then `new` steps) and the prompts' first logits;
    `spare` positions are reserved beyond prompt + new."""
    logits = decoder.add(prompts, reserve=max(map(len, prompts)) + new + spare)
    first = logits.copy()
    out: list[list[int]] = [[] for _ in prompts]
    for _ in range(new):
        tokens = logits.argmax(-1)
        for row, token in enumerate(tokens):
            out[row].append(int(token))
        logits = decoder.step(tokens[:, None])[:, -1]
    return out, first


def join_leave(decoder: Any, prompts: list[list[int]], steps: int, reserve: int, join_reserve: int) -> list[list[int]]:
    """Greedy ids as rows join and leave: the first two prompts start, the third joins after 4
    tokens, the middle row leaves after 8 (batch sizes 2, 3, 2); rows in prompt order."""
    logits = decoder.add(prompts[:2], reserve=reserve)
    out: list[list[int]] = [[], []]
    for t in range(steps):
        tokens = logits.argmax(-1)
        for row, token in enumerate(tokens):
            out[row].append(int(token))
        logits = decoder.step(tokens[:, None])[:, -1]
        if t == 3:
            logits = np.concatenate([logits, decoder.add([prompts[2]], reserve=join_reserve)])
            out.append([])
        if t == 7:
            decoder.keep([0, 2])
            logits = logits[[0, 2]]
            out = [out[0], out[2], out[1]]
    return out
