"""Generation: TextGenerator, sampling, the KV-cached decoder, streaming detokenization."""

from .generator import GenerationResult, PromptLogprobs, ScoreResult, TextGenerator
from .sampling import SamplingSettings

__all__ = ["GenerationResult", "PromptLogprobs", "SamplingSettings", "ScoreResult", "TextGenerator"]
