"""Repeats and interleaving: a number is the median of several runs, with its spread shown,
and engines compared in one run take turns (A B A B ...) so a slow minute hits all of them."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from statistics import median
from typing import Any


@dataclass(frozen=True)
class Stats:
    """Median of `n` samples with min/max; `spread` = (max - min) / median."""

    median: float
    min: float
    max: float
    n: int

    @property
    def spread(self) -> float:
        return (self.max - self.min) / self.median if self.median else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "spread": self.spread}

    def __str__(self) -> str:
        return f"{self.median:.3g} ±{self.spread * 50:.0f}%" if self.n > 1 else f"{self.median:.3g}"


def stats(samples: Sequence[float]) -> Stats:
    if not samples:
        raise ValueError("no samples")
    return Stats(float(median(samples)), float(min(samples)), float(max(samples)), len(samples))


def time_calls(fn: Callable[[], Any], repeat: int, warmup: int = 1) -> list[float]:
    """Wall ms of `repeat` calls of `fn` after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        out.append((time.perf_counter() - start) * 1000)
    return out


def interleave(candidates: dict[str, Callable[[], float]], rounds: int) -> dict[str, list[float]]:
    """Call each candidate once per round, in turn; each call returns one measurement."""
    samples: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(rounds):
        for name, measure in candidates.items():
            samples[name].append(measure())
    return samples


def ratio_stats(reference: Sequence[float], value: Sequence[float], higher_is_better: bool = False) -> Stats:
    """Per-round speed-ups (round i of the reference against round i of the value), summarised."""
    pairs = [(r, v) for r, v in zip(reference, value) if r and v]
    return stats([(v / r) if higher_is_better else (r / v) for r, v in pairs])
