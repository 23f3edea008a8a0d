"""The shipped Japanese corpus: training text for the twins, held-out text for quality reports.

It lives outside `twins/` because export itself reads the held-out lines (int8/fp16 quality
report), and product code must not import the test-twin builder.
"""

from __future__ import annotations

from importlib import resources

CORPUS_FILE = "corpus_ja.txt"
HELDOUT_EVERY = 10  # every 10th corpus line is held out of all training


def corpus_lines() -> list[str]:
    text = resources.files(__package__).joinpath("data", CORPUS_FILE).read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip()]


def train_lines() -> list[str]:
    return [line for i, line in enumerate(corpus_lines()) if i % HELDOUT_EVERY]


def heldout_lines() -> list[str]:
    """Sentences no twin saw in training: for parity and quality reports."""
    return [line for i, line in enumerate(corpus_lines()) if not i % HELDOUT_EVERY]
