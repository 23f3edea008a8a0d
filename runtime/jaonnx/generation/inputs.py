"""Input processing: prompts and options to per-prompt token ids, text and settings.

The one path from what a caller sends to what the engine runs, for the Python API
(`generate`, `stream`, `score`) and the HTTP server alike (as vLLM v1's input processor):
each prompt is encoded once and its settings are resolved for its own length (a card's
`max_length` counts the prompt), so a short prompt gets the same settings in a batch of long
ones, over HTTP as in Python. Every error is raised here, before any model work.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import JaonnxError
from .sampling import SamplingSettings

Encode = Callable[[str], list[int]]
Resolve = Callable[..., SamplingSettings]


@dataclass(frozen=True)
class ProcessedPrompt:
    """One prompt ready for `GenerationEngine.add_request`: its text, its ids and its settings.
    The engine takes the text as given and never decodes the ids back."""

    text: str
    ids: tuple[int, ...]
    settings: SamplingSettings


class InputProcessor:
    """Turns prompts + options into `ProcessedPrompt`s with the model's `encode` and
    `resolve(prompt_len, **options)` (its card defaults and limits)."""

    def __init__(self, encode: Encode, resolve: Resolve) -> None:
        self._encode = encode
        self._resolve = resolve

    def process(self, prompts: str | Sequence[str], **options: Any) -> list[ProcessedPrompt]:
        """Every prompt encoded and resolved, or a `JaonnxError` naming the field at fault
        (`prompt`, `prompt[i]` in a list of several, or the option)."""
        texts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not texts:
            raise JaonnxError("no prompts given: pass a prompt or a non-empty list of prompts", "prompt")
        encoded = []
        for i, text in enumerate(texts):
            try:
                encoded.append(self._encode(text))
            except JaonnxError as exc:
                if len(texts) == 1 or exc.field != "prompt":
                    raise
                raise JaonnxError(str(exc), f"prompt[{i}]") from None
        return [ProcessedPrompt(t, tuple(ids), self._resolve(len(ids), **options)) for t, ids in zip(texts, encoded)]
