"""Generation: TextGenerator, sampling, the KV-cached decoder, streaming detokenization."""

from .generator import GenerationResult, ScoreResult, TextGenerator
from .sampling import SamplingSettings

__all__ = ["GenerationResult", "SamplingSettings", "ScoreResult", "TextGenerator"]
