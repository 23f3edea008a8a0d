"""Sampling against transformers' own logits processors.

On random logits, the ids that survive repetition penalty, temperature, top-k and top-p, and
their renormalized probabilities, must be what `RepetitionPenaltyLogitsProcessor`,
`TemperatureLogitsWarper`, `TopKLogitsWarper` and `TopPLogitsWarper` give in transformers'
order; and `next_tokens` must draw from exactly that distribution (a chi-square test over
20k seeded draws, so the test is deterministic).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from transformers.generation.logits_process import (
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from jaonnx.generation.sampling import (
    SamplingSettings,
    apply_repetition_penalty,
    apply_top_k,
    apply_top_p,
    next_tokens,
)
from jaonnx.numeric import softmax

VOCAB = 64
DRAWS = 20_000


def reference_probs(logits: np.ndarray, history: list[int], s: SamplingSettings) -> np.ndarray:
    """transformers' processors in `generate`'s order, then softmax: [vocab] float64."""
    processors = LogitsProcessorList()
    if s.repetition_penalty != 1.0:
        processors.append(RepetitionPenaltyLogitsProcessor(s.repetition_penalty))
    if s.temperature != 1.0:
        processors.append(TemperatureLogitsWarper(s.temperature))
    if s.top_k:
        processors.append(TopKLogitsWarper(s.top_k))
    if s.top_p < 1.0:
        processors.append(TopPLogitsWarper(s.top_p))
    ids = torch.tensor([history or [0]], dtype=torch.long)
    scores = processors(ids, torch.tensor(logits[None], dtype=torch.float32))
    return torch.softmax(scores.double(), -1)[0].numpy()


def our_probs(logits: np.ndarray, history: list[int], s: SamplingSettings) -> np.ndarray:
    """The public processors in the order `next_tokens` documents."""
    x = np.array(logits[None], dtype=np.float32)
    apply_repetition_penalty(x, [history], s.repetition_penalty)
    x /= np.float32(s.temperature)
    apply_top_k(x, s.top_k)
    apply_top_p(x, s.top_p)
    return softmax(x)[0]


def chi_square_critical(df: int, z: float = 3.719) -> float:
    """The chi-square value exceeded with probability 1e-4 (z: the normal 1e-4 quantile),
    from scipy when installed, else by the Wilson-Hilferty approximation (within 1% here)."""
    try:
        from scipy.stats import chi2
    except ImportError:
        return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3
    return float(chi2.ppf(1 - 1e-4, df))


def chi_square(counts: np.ndarray, probs: np.ndarray) -> tuple[float, int]:
    """Pearson's statistic over the surviving ids, bins with expected count < 5 pooled."""
    expected = probs * counts.sum()
    keep = expected >= 5
    obs = list(counts[keep]) + ([counts[~keep].sum()] if (~keep & (probs > 0)).any() else [])
    exp = list(expected[keep]) + ([expected[~keep].sum()] if (~keep & (probs > 0)).any() else [])
    obs_a, exp_a = np.array(obs, dtype=np.float64), np.array(exp)
    return float(((obs_a - exp_a) ** 2 / exp_a).sum()), len(obs_a) - 1


def random_logits(seed: int, scale: float = 2.5) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(VOCAB) * scale).astype(np.float32)


CASES = {
    "temperature": dict(temperature=0.7),
    "top_k": dict(top_k=9),
    "top_p": dict(top_p=0.8),
    "penalty": dict(repetition_penalty=1.3),
    "all four": dict(temperature=1.4, top_k=20, top_p=0.9, repetition_penalty=1.2),
    "cold, penalty first": dict(temperature=0.5, top_k=30, top_p=0.95, repetition_penalty=2.0),
}


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("case", sorted(CASES))
def test_survivors_and_probabilities_equal_transformers(case, seed):
    s = SamplingSettings(max_new_tokens=1, do_sample=True, **CASES[case])
    logits = random_logits(seed)
    history = [int(i) for i in np.random.default_rng(100 + seed).integers(0, VOCAB, 12)]
    ref, ours = reference_probs(logits, history, s), our_probs(logits, history, s)
    np.testing.assert_array_equal(np.flatnonzero(ours), np.flatnonzero(ref))
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-7)
    if s.top_k or s.top_p < 1:
        assert 0 < np.count_nonzero(ref) < VOCAB  # the filter removed something: a real check


@pytest.mark.parametrize("side", [-1, 1])
def test_top_p_boundary_token(side):
    """top_p just below / just above the mass of the k most likely tokens: the token whose
    probability crosses top_p is kept (transformers keeps the smallest set reaching top_p)."""
    logits = random_logits(7)
    desc = np.sort(softmax(logits.astype(np.float64)))[::-1]
    k = 6
    top_p = float(desc[:k].sum()) + side * 1e-4
    s = SamplingSettings(max_new_tokens=1, do_sample=True, top_p=top_p)
    ref, ours = reference_probs(logits, [], s), our_probs(logits, [], s)
    assert np.count_nonzero(ref) == (k if side < 0 else k + 1)
    np.testing.assert_array_equal(np.flatnonzero(ours), np.flatnonzero(ref))
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-7)


def tied_logits() -> np.ndarray:
    """Four distinct leaders (6, 5, 4, 3) over a plateau of 24 equal logits (2.0)."""
    logits = np.array([3.0, 1.0, 2.0, 2.0, 2.0, 2.0, 0.5, 2.0, 2.0, -1.0] * 4, dtype=np.float32)
    logits[::10] += np.arange(4, dtype=np.float32)
    return logits


@pytest.mark.parametrize("settings", [dict(top_k=5), dict(top_k=7), dict(top_k=7, top_p=0.6), dict(top_p=0.5)])
def test_ties_at_the_top_k_cut_all_survive(settings):
    """transformers keeps every logit equal to the k-th (here the whole plateau)."""
    s = SamplingSettings(max_new_tokens=1, do_sample=True, **settings)
    ref, ours = reference_probs(tied_logits(), [], s), our_probs(tied_logits(), [], s)
    np.testing.assert_array_equal(np.flatnonzero(ours), np.flatnonzero(ref))
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("top_p", [0.8, 0.85, 0.9])
def test_ties_at_the_top_p_cut(top_p):
    """The top_p cut inside the plateau: as many equal ids survive, with the same
    probabilities. Which of the equal ids survive is not defined by transformers (it sorts
    with torch.sort, which is not stable); jaonnx's stable sort keeps the highest ids."""
    s = SamplingSettings(max_new_tokens=1, do_sample=True, top_p=top_p)
    logits = tied_logits()
    ref, ours = reference_probs(logits, [], s), our_probs(logits, [], s)
    plateau = logits == 2.0
    kept = np.count_nonzero(ref[plateau])
    assert 0 < kept < plateau.sum()  # the cut is inside the plateau
    assert np.count_nonzero(ours[plateau]) == kept
    np.testing.assert_array_equal(np.flatnonzero(ours[~plateau]), np.flatnonzero(ref[~plateau]))
    np.testing.assert_allclose(np.sort(ours), np.sort(ref), rtol=1e-5, atol=1e-7)
    tied_kept = np.flatnonzero(plateau & (ours > 0))
    assert list(tied_kept) == list(np.flatnonzero(plateau)[-kept:])  # the documented choice


@pytest.mark.parametrize("case", ["all four", "top_p", "cold, penalty first"])
def test_next_tokens_draws_match_transformers_probabilities(case):
    """20k draws through `next_tokens` itself (so its processor order is what is tested)."""
    s = SamplingSettings(max_new_tokens=8, do_sample=True, seed=0, **CASES[case])
    logits = random_logits(3, scale=1.0)  # flat enough that many ids survive
    history = [5, 9, 9, 17, 30, 41]
    ref = reference_probs(logits, history, s)
    batch = np.repeat(logits[None], DRAWS, axis=0)
    tokens = next_tokens(batch, [history] * DRAWS, 4, s, np.random.default_rng(1234))
    counts = np.bincount(tokens, minlength=VOCAB)
    assert counts[ref == 0].sum() == 0, "drew an id transformers filters out"
    stat, df = chi_square(counts, ref)
    assert df >= 3
    assert stat < chi_square_critical(df), (stat, df)


def test_the_chi_square_check_can_fail():
    """The same statistic rejects draws from a slightly wrong distribution (temperature 0.9
    where transformers was asked for 1.0), so the test above has power."""
    s = SamplingSettings(max_new_tokens=8, do_sample=True, seed=0, top_k=12)
    logits = random_logits(3, scale=1.0)
    ref = reference_probs(logits, [], s)
    wrong = SamplingSettings(max_new_tokens=8, do_sample=True, top_k=12, temperature=0.9)
    tokens = next_tokens(np.repeat(logits[None], DRAWS, axis=0), [], 0, wrong, np.random.default_rng(1234))
    stat, df = chi_square(np.bincount(tokens, minlength=VOCAB), ref)
    assert stat > chi_square_critical(df)
