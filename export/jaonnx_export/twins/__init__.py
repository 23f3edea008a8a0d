"""Offline twins of the five models, trained on the shipped Japanese corpus."""

from .build import TWINS, build_twin, build_twins, corpus_lines, heldout_lines, train_lines

__all__ = ["TWINS", "build_twin", "build_twins", "corpus_lines", "heldout_lines", "train_lines"]
