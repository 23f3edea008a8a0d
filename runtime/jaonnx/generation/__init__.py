"""Generation: TextGenerator, the continuous-batching engine, options, sampling, streaming."""

from .engine import GenerationEngine, RequestOutput, TokenLogprob
from .generator import GenerationResult, PromptLogprobs, ResultCollector, ScoreResult, TextGenerator
from .options import GENERATION_OPTIONS, Option, resolve_settings
from .sampling import SamplingSettings

__all__ = [
    "GENERATION_OPTIONS", "GenerationEngine", "GenerationResult", "Option", "PromptLogprobs", "RequestOutput", "ResultCollector", "SamplingSettings",
    "ScoreResult", "TextGenerator", "TokenLogprob", "resolve_settings",
]
