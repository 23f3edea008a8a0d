"""The generation options, defined once.

`GENERATION_OPTIONS` is the table the Python API, the HTTP request schemas and the command
line are all derived from; `resolve_settings` is the one place that turns the model card's
defaults plus the caller's options into `SamplingSettings`, including the position budget.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..errors import JaonnxError
from ..recipes import GenerationDefaults
from .constraints import constraint_spec
from .sampling import SamplingSettings

INT64 = 2**63 - 1
MAX_TOKENS = 1 << 20
MAX_STOPS = 4


@dataclass(frozen=True)
class Option:
    """One generation option: its type, what it does, and the protocol bounds the HTTP schema
    enforces (the model's own limits are checked by `resolve_settings`)."""

    name: str
    type: Any
    help: str
    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    cli: bool = True  # offered by `jaonnx generate`
    http: bool = True  # accepted by `/v1/generate`


GENERATION_OPTIONS: tuple[Option, ...] = (
    Option("max_new_tokens", int, "Tokens to generate (default: the model card's).", ge=1, le=MAX_TOKENS),
    Option("min_new_tokens", int, "Tokens to generate before end-of-text is allowed.", ge=0, le=MAX_TOKENS),
    Option("do_sample", bool, "Sample (the card's default) or decode greedily."),
    Option("temperature", float, "Sampling temperature (0 = greedy).", ge=0, le=1e6),
    Option("top_k", int, "Keep the k most likely tokens (0 = off).", ge=0, le=INT64),
    Option("top_p", float, "Nucleus sampling: keep the most likely tokens up to this mass, in (0, 1].", gt=0, le=1),
    Option("repetition_penalty", float, "> 1 discourages tokens already in the text.", gt=0, le=1e6),
    Option("num_return_sequences", int, "Samples per prompt.", ge=1, le=64),
    Option("seed", int, "Seed for reproducible sampling.", ge=0, le=INT64),
    Option("stop", list[str], f"Stop before any of these strings (at most {MAX_STOPS})."),
    Option("eos_token_id", int, "End-of-text token id (default: the model's; None in Python: none).", ge=0, le=INT64),
    Option("bad_words_ids", list[list[int]], "Token-id sequences that must never be generated.", cli=False),
    Option("prompt_lookup", int, "Greedy only: draft up to N tokens by matching the prompt's n-grams "
           "(exact: the output equals plain greedy).", ge=0, le=64),
    Option("logprobs", int, "Also return the log-probability of each generated token and the top N.", ge=0, le=20),
    # Structured output (generation/constraints.py; needs `jaonnx[structured]`): at most one of these.
    Option("json_schema", str, "Output JSON valid under this JSON schema (JSON text; a dict in Python/HTTP)."),
    Option("json_object", bool, "Output one JSON object."),
    Option("regex", str, "Output a full match of this regular expression."),
    Option("choice", list[str], "Output exactly one of these strings."),
    Option("grammar", str, "Output a sentence of this grammar (Lark, or llama.cpp's GBNF)."),
)
OPTION_NAMES = frozenset(o.name for o in GENERATION_OPTIONS)


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
    `token_id(word)` maps a card's bad word to its id."""
    unknown = sorted(set(options) - OPTION_NAMES)
    if unknown:
        raise JaonnxError(f"unknown generation option(s): {', '.join(unknown)}", unknown[0])
    given = {k: v for k, v in options.items() if v is not None or k == "eos_token_id"}
    d = defaults
    max_new = given.get("max_new_tokens")
    if max_new is None:
        max_new = max(1, d.max_length - prompt_len) if d.max_length else d.max_new_tokens
    min_new = given.get("min_new_tokens")
    if min_new is None:
        min_new = max(0, d.min_length - prompt_len) if d.min_length else d.min_new_tokens
    bad = given.get("bad_words_ids")
    if bad is None:
        bad = [[token_id(w)] for w in d.bad_words]
    do_sample = given.get("do_sample", d.do_sample)
    stop = given.get("stop", ())
    settings = SamplingSettings(
        max_new_tokens=max_new,
        min_new_tokens=min_new,
        do_sample=do_sample,
        temperature=given.get("temperature", d.temperature),
        top_k=given.get("top_k", d.top_k),
        top_p=given.get("top_p", d.top_p),
        repetition_penalty=given.get("repetition_penalty", d.repetition_penalty),
        num_return_sequences=given.get("num_return_sequences", d.num_return_sequences if do_sample else 1),
        bad_words_ids=_id_lists(bad),
        eos_token_id=given.get("eos_token_id", model_eos_id),
        seed=given.get("seed"),
        stop=(stop,) if isinstance(stop, str) else tuple(stop),
        prompt_lookup=given.get("prompt_lookup", 0),
        logprobs=given.get("logprobs"),
        constraint=constraint_spec(given),  # structured output
    ).validate(vocab_size)
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
