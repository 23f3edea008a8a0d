"""Offline twins of the five models, trained on the shipped Japanese corpus."""

from .build import TEST_TWINS, TWINS, build_twin, build_twins, corpus_lines, heldout_lines, train_lines, twin_spec

__all__ = ["TEST_TWINS", "TWINS", "twin_spec", "build_twin", "build_twins", "corpus_lines", "heldout_lines", "train_lines"]
