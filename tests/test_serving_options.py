"""Options once: `SamplingSettings`' field metadata is the one definition of every generation
option (Python validation, the HTTP schema, the CLI), and `ServeConfig` the one of every
server setting (`jaonnx serve`'s options)."""

from __future__ import annotations

import inspect
from dataclasses import fields
from typing import Any

import pytest

from jaonnx.errors import JaonnxError
from jaonnx.generation import GENERATION_OPTIONS, SamplingSettings
from jaonnx.generation.options import OPTION_NAMES
from jaonnx.generation.spec import MAX_STOPS
from serving_support import need

need("fastapi", "serve")

from jaonnx.serving.schemas import CompletionRequest, GenerateRequest, RequestError, parse, stops  # noqa: E402

VOCAB = 1000
NUMERIC = [o for o in GENERATION_OPTIONS if o.type in (int, float)]


def test_the_table_is_the_settings_fields() -> None:
    """Every settings field with option metadata, then the constraint spellings, which resolve
    into the one `constraint` field (a result, not an option)."""
    from jaonnx.generation.constraints import CONSTRAINT_OPTIONS

    settable = [f.name for f in fields(SamplingSettings) if f.metadata.get("option")]
    assert [o.name for o in GENERATION_OPTIONS] == settable + list(CONSTRAINT_OPTIONS)
    assert "constraint" not in OPTION_NAMES
    http = {o.name for o in GENERATION_OPTIONS if o.http}
    assert http <= set(GenerateRequest.model_fields) and "prompt_logprobs" in http


def outside(option: Any) -> list[Any]:
    """Values just past each of the option's bounds."""
    step = 1 if option.type is int else 1e-3
    values = []
    if option.ge is not None:
        values.append(option.type(option.ge - step))
    if option.gt is not None:
        values.append(option.type(option.gt))
    if option.le is not None and option.le < 2**62:
        values.append(option.type(option.le + step))
    return values


@pytest.mark.parametrize("option", NUMERIC, ids=[o.name for o in NUMERIC])
def test_python_and_http_refuse_the_same_values(option: Any) -> None:
    """Each bound holds in Python (`validate`) and over HTTP (the schema), naming the field."""
    bad = outside(option)
    assert bad, option
    base = {"max_new_tokens": 4, "do_sample": True}
    for value in bad:
        with pytest.raises(JaonnxError) as err:
            SamplingSettings(**{**base, option.name: value}).validate(VOCAB)
        assert err.value.field == option.name
        with pytest.raises(RequestError) as http:
            parse(GenerateRequest, {"model": "m", "prompt": "x", option.name: value})
        assert http.value.field == option.name and http.value.status == 422
    edge = option.type(option.le if option.le is not None and option.le <= 64 else option.ge or 1)
    if option.name == "eos_token_id" or option.name == "prompt_lookup":
        edge = 0
    SamplingSettings(**{**base, option.name: edge}).validate(VOCAB)  # the bound itself is allowed
    parse(GenerateRequest, {"model": "m", "prompt": "x", option.name: edge})


def test_stop_limit_is_one_constant() -> None:
    many = [f"s{i}" for i in range(MAX_STOPS + 1)]
    with pytest.raises(JaonnxError, match=f"at most {MAX_STOPS}") as err:
        SamplingSettings(max_new_tokens=2, stop=tuple(many)).validate(VOCAB)
    assert err.value.field == "stop"
    with pytest.raises(RequestError) as http:
        stops(many)
    assert http.value.field == "stop"
    assert stops(many[:MAX_STOPS]) == tuple(many[:MAX_STOPS])
    SamplingSettings(max_new_tokens=2, stop=tuple(many[:MAX_STOPS])).validate(VOCAB)


def test_completion_request_maps_to_runtime_options() -> None:
    greedy = parse(CompletionRequest, {"model": "m", "prompt": "x", "temperature": 0, "echo": True, "logprobs": 2,
                                       "max_tokens": 5, "n": 3, "stop": "。"})
    options = greedy.to_options()
    assert set(options) <= OPTION_NAMES
    assert greedy.greedy and options["do_sample"] is False and options["num_return_sequences"] == 1
    assert options["max_new_tokens"] == 5 and options["prompt_logprobs"] == 2 and options["stop"] == ("。",)
    sampled = parse(CompletionRequest, {"model": "m", "prompt": "x", "n": 2, "top_p": 0.5}).to_options()
    assert sampled["do_sample"] is True and sampled["num_return_sequences"] == 2 and sampled["top_p"] == 0.5
    assert sampled["prompt_logprobs"] is None and sampled["max_new_tokens"] == 16  # OpenAI's default


def test_serve_options_are_the_config_fields() -> None:
    from typer.testing import CliRunner

    from jaonnx.cli import app
    from jaonnx.serving.command import serve
    from jaonnx.serving.config import ServeConfig

    names = set(inspect.signature(serve).parameters)
    assert {f.name for f in fields(ServeConfig)} <= names
    help_text = CliRunner().invoke(app, ["serve", "--help"], terminal_width=200).output
    for f in fields(ServeConfig):
        flag = (f.metadata["setting"].flags or ("--" + f.name.replace("_", "-"),))[0].split("/")[0]
        assert flag in help_text, flag
    with pytest.raises(JaonnxError, match="unknown serving option 'bogus'") as err:
        ServeConfig().update(bogus=1)
    assert err.value.field == "bogus"
    assert ServeConfig().update(max_queue=3, request_timeout=5.0).max_queue == 3


def test_cli_flags_and_openai_names_come_from_the_table() -> None:
    from typer.testing import CliRunner

    from jaonnx.cli import app
    from jaonnx.serving.openai import ALIASES

    assert ALIASES == {"max_new_tokens": "max_tokens", "num_return_sequences": "n"}
    assert set(ALIASES.values()) <= set(CompletionRequest.model_fields)
    help_text = CliRunner().invoke(app, ["generate", "--help"], terminal_width=200).output
    for option in GENERATION_OPTIONS:
        for flag in option.flags[0].split("/"):
            assert (flag in help_text) == option.cli, (option.name, flag)
