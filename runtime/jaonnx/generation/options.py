"""The generation options, defined once: as the fields of `SamplingSettings`.

`GENERATION_OPTIONS` is read from those fields' metadata (see `spec.py`); the Python API, the
HTTP request schemas and the command line are all derived from it; `resolve_settings` is the one place that turns the model card's
defaults plus the caller's options into `SamplingSettings`, including the position budget.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from ..errors import JaonnxError
from ..recipes import GenerationDefaults
from .constraints import CONSTRAINT_OPTION_SPECS, CONSTRAINT_OPTIONS, constraint_spec
from .sampling import SamplingSettings
from .spec import INT64, MAX_STOPS, MAX_TOKENS, OptionSpec

__all__ = ["GENERATION_OPTIONS", "INT64", "MAX_STOPS", "MAX_TOKENS", "OPTION_NAMES", "Option", "resolve_settings"]


@dataclass(frozen=True)
class Option:
    """One generation option: its name and its `OptionSpec` fields (type, help, the protocol
    bounds, the surfaces offering it), read from `SamplingSettings`' field metadata."""

    name: str
    type: Any
    help: str
    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    cli: bool = True  # offered by `jaonnx generate`
    http: bool = True  # accepted by `/v1/generate`
    flags: tuple[str, ...] = ()  # `jaonnx generate`'s flags
    openai: str | None = None  # OpenAI's name, where it differs

    @classmethod
    def of(cls, name: str, spec: OptionSpec) -> Option:
        flags = spec.flags or ("--" + name.replace("_", "-"),)
        return cls(name, spec.type, spec.help, spec.ge, spec.gt, spec.le, spec.cli, spec.http, flags, spec.openai)


# Fields whose metadata has no option (the compiled `constraint`) are results, not options. The
# structured-output spellings are options that resolve into that one field (constraints.py).
GENERATION_OPTIONS: tuple[Option, ...] = tuple(
    Option.of(f.name, f.metadata["option"]) for f in fields(SamplingSettings) if f.metadata.get("option")
) + tuple(Option.of(name, spec) for name, spec in CONSTRAINT_OPTION_SPECS.items())
OPTION_NAMES = frozenset(o.name for o in GENERATION_OPTIONS)
CARD_DEFAULTS = frozenset(f.name for f in fields(GenerationDefaults))  # options the model card can set


def resolve_settings(
    defaults: GenerationDefaults,
    prompt_len: int,
    *,
    max_positions: int,
    vocab_size: int,
    model_eos_id: int | None,
    token_id: Any,
    **options: Any,
) -> SamplingSettings:
    """Card defaults overridden by `options`, validated, and checked against the position
    budget. None means "the default", except `eos_token_id=None`: no end-of-text token.
    `token_id(word)` maps a card's bad word to its id.

    An option the caller leaves out takes the card's value when the card has one (a card's
    `max_length`/`min_length` count the prompt, so they depend on `prompt_len`), else the
    field's default."""
    unknown = sorted(set(options) - OPTION_NAMES)
    if unknown:
        raise JaonnxError(f"unknown generation option(s): {', '.join(unknown)}", unknown[0])
    given = {k: v for k, v in options.items() if v is not None or k == "eos_token_id"}
    d = defaults
    if "max_new_tokens" not in given:
        given["max_new_tokens"] = max(1, d.max_length - prompt_len) if d.max_length else d.max_new_tokens
    if "min_new_tokens" not in given:
        given["min_new_tokens"] = max(0, d.min_length - prompt_len) if d.min_length else d.min_new_tokens
    given.setdefault("do_sample", d.do_sample)
    if "num_return_sequences" not in given:
        given["num_return_sequences"] = d.num_return_sequences if given["do_sample"] else 1
    given["bad_words_ids"] = _id_lists(given["bad_words_ids"]) if "bad_words_ids" in given else tuple(
        (token_id(w),) for w in d.bad_words)
    given.setdefault("eos_token_id", model_eos_id)
    stop = given.get("stop", ())
    given["stop"] = (stop,) if isinstance(stop, str) else tuple(stop)
    for name in CARD_DEFAULTS & OPTION_NAMES:
        given.setdefault(name, getattr(d, name))
    given["constraint"] = constraint_spec({k: given.pop(k, None) for k in CONSTRAINT_OPTIONS})  # structured output
    settings = SamplingSettings(**given).validate(vocab_size)
    check_position_budget(prompt_len, settings.max_new_tokens, max_positions)
    return settings


def _id_lists(value: Any) -> tuple[tuple[int, ...], ...]:
    try:
        return tuple(tuple(seq) for seq in value)
    except TypeError:
        raise JaonnxError(f"bad_words_ids must be a list of lists of token ids, got {value!r}", "bad_words_ids") from None


def check_position_budget(prompt_len: int, max_new_tokens: int, limit: int) -> None:
    """The prompt and everything generated must fit the model's position table."""
    if prompt_len >= limit:
        raise JaonnxError(f"prompt is {prompt_len} tokens but the model has {limit} positions: shorten it", "prompt")
    if prompt_len + max_new_tokens > limit:
        raise JaonnxError(
            f"prompt ({prompt_len} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model's {limit} "
            f"positions: lower max_new_tokens to {limit - prompt_len} or less",
            "max_new_tokens",
        )
