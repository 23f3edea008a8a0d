"""Reading and checking requests: size, UTF-8, JSON, and each model's own limits, so a bad
request is a 4xx naming its field before any model work is queued."""

from __future__ import annotations

import json
from typing import Any

from ..errors import JaonnxError
from .batcher import GenerationJob
from .schemas import MAX_PREDICTIONS, CompletionRequest, RequestError


def one_line(exc: Exception) -> str:
    return " ".join(str(exc).split())


async def read_json(request: Any, limit: int) -> Any:
    """The body as JSON, refusing over-large bodies early and anything not UTF-8."""
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > limit):
        raise RequestError(413, f"body is larger than {limit} bytes", "body")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise RequestError(413, f"body is larger than {limit} bytes", "body")
    if not body:
        raise RequestError(400, "empty body: send a JSON object", "body")
    try:
        text = bytes(body).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RequestError(400, f"body is not valid UTF-8 (byte {exc.start})", "body") from None
    try:
        data = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise RequestError(400, f"body is not valid JSON: {str(exc)[:120]}", "body") from None
    check_strings(data)
    return data


def check_strings(data: Any) -> None:
    """JSON may carry lone surrogates (\\ud800) that no tokenizer can take: refuse them."""
    stack: list[tuple[str, Any]] = [("body", data)]
    while stack:
        where, value = stack.pop()
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                raise RequestError(400, f"{where} holds a lone surrogate, not valid Unicode text", where) from None
        elif isinstance(value, dict):
            for key, item in value.items():
                name = key if where == "body" else where
                stack.extend([(where, key), (name, item)])
        elif isinstance(value, list):
            stack.extend((where, item) for item in value)


def lookup(served: dict[str, Any], name: str, task: str) -> Any:
    if name not in served:
        raise RequestError(404, f"model {name[:80]!r} is not served here: GET /v1/models lists them", "model",
                           "not_found_error")
    m = served[name]
    if m.task != task:
        raise RequestError(400, f"model {name!r} is a {m.task} model, not {task}", "model")
    return m


def check_masked(model: Any, items: list[str], single: bool, top_k: int) -> None:
    masks = 0
    for i, text in enumerate(items):
        try:
            masks += len(model.encode(text)["mask_positions"])
        except JaonnxError as exc:
            raise RequestError(400, one_line(exc), "inputs" if single else f"inputs[{i}]") from None
    if masks * top_k > MAX_PREDICTIONS:
        raise RequestError(413, f"{masks} masks x top_k {top_k} = {masks * top_k} predictions; at most "
                                f"{MAX_PREDICTIONS} per request: lower top_k or split the request", "top_k")


def prepare(model: Any, prompts: list[str], options: dict[str, Any], aliases: dict[str, str], stream: bool,
            *, scoring: int | None = None, prompt_field: str = "prompt") -> GenerationJob:
    """Run the model's input processor now (each prompt encoded once, its settings resolved
    for its own length, as in Python), so that errors are a 400 before any streaming.

    `scoring` (a top-N, 0 for none) makes the job a scoring job instead (`scoring_inputs`);
    `aliases` maps the runtime's option names to the request's (OpenAI says `max_tokens`) and
    `prompt_field` names the prompts (`/v1/score` says `input`). A `JaonnxError` names its
    field, so no message is ever parsed."""
    try:
        if scoring is not None:
            inputs = model.scoring_inputs(prompts, scoring, **options)
        else:
            inputs = model.process(prompts, **options)
    except JaonnxError as exc:
        field = exc.field
        if field is not None and (field == "prompt" or field.startswith("prompt[")):
            field = prompt_field + field[len("prompt"):]
        elif field is not None:
            field = aliases.get(field, field)
        message = one_line(exc)
        for name, alias in aliases.items():
            message = message.replace(name, alias)
        raise RequestError(400, message, field) from None
    return GenerationJob(sink=lambda _: None, inputs=inputs, stream=stream, scoring=scoring is not None)


def check_rows(rows: int, n: int, max_batch_size: int, n_field: str) -> None:
    """One request may fill the batch but not exceed it: that bounds the memory of a request."""
    if rows > max_batch_size:
        raise RequestError(413, f"{rows} sequences (prompts x {n_field}); this server runs at most "
                                f"{max_batch_size} per request: split the request",
                           n_field if n > 1 else "prompt")


def openai_unsupported(req: CompletionRequest) -> None:
    checks = [
        ("suffix", bool(req.suffix)),
        ("presence_penalty", bool(req.presence_penalty)), ("frequency_penalty", bool(req.frequency_penalty)),
        ("logit_bias", bool(req.logit_bias)), ("best_of", req.best_of not in (None, req.n or 1)),
    ]
    for name, bad in checks:
        if bad:
            raise RequestError(400, f"{name} is not supported by this server: leave it out", name)
