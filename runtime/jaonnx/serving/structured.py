"""`/v1/completions` structured output in OpenAI's and vLLM's spellings, mapped to the runtime's
constraint options (`json_schema`, `json_object`, `regex`, `choice`, `grammar`).

OpenAI: `response_format: {"type": "json_schema", "json_schema": {"name": ..., "schema": {...}}}`
or `{"type": "json_object"}`. vLLM: `structured_outputs: {"json" | "regex" | "choice" | "grammar"
| "json_object": ...}` and the older `guided_json` / `guided_regex` / `guided_choice` /
`guided_grammar`. At most one of them per request.
"""

from __future__ import annotations

from typing import Any

from .schemas import CompletionRequest, RequestError

GUIDED = {"guided_json": "json_schema", "guided_regex": "regex", "guided_choice": "choice", "guided_grammar": "grammar"}
VLLM_KEYS = {"json": "json_schema", "regex": "regex", "choice": "choice", "grammar": "grammar", "json_object": "json_object"}


def completion_constraint(req: CompletionRequest) -> tuple[dict[str, Any], dict[str, str]]:
    """The runtime's constraint option for the request (empty when it has none) and, for error
    messages, runtime option name -> the request field that gave it."""
    found: list[tuple[str, str, Any]] = []  # (request field, runtime option, value)
    if req.response_format is not None:
        found.extend(_response_format(req.response_format))
    if req.structured_outputs is not None:
        found.extend(_structured_outputs(req.structured_outputs))
    for name, option in GUIDED.items():
        value = getattr(req, name)
        if value is not None:
            found.append((name, option, value))
    if not found:
        return {}, {}
    if len(found) > 1:
        raise RequestError(400, f"give one structured-output constraint, not {found[0][0]} and {found[1][0]}",
                           found[1][0])
    field, option, value = found[0]
    return {option: value}, {option: field}


def _response_format(value: dict[str, Any]) -> list[tuple[str, str, Any]]:
    kind = value.get("type")
    if kind == "text":
        return []
    if kind == "json_object":
        return [("response_format", "json_object", True)]
    if kind == "json_schema":
        spec = value.get("json_schema")
        if not isinstance(spec, dict):
            raise RequestError(400, "response_format.json_schema must be an object holding the schema",
                               "response_format")
        if "schema" not in spec and set(spec) <= {"name", "description", "strict"}:
            raise RequestError(400, "response_format.json_schema has no schema: put it under \"schema\"",
                               "response_format")
        schema = spec["schema"] if "schema" in spec else spec  # OpenAI nests it under "schema"; vLLM takes it bare
        return [("response_format", "json_schema", schema)]
    raise RequestError(400, f"response_format.type must be text, json_object or json_schema, got {kind!r}",
                       "response_format")


def _structured_outputs(value: dict[str, Any]) -> list[tuple[str, str, Any]]:
    unknown = sorted(set(value) - set(VLLM_KEYS))
    if unknown:
        raise RequestError(400, f"structured_outputs has no key {unknown[0]!r}: use one of {', '.join(VLLM_KEYS)}",
                           "structured_outputs")
    return [("structured_outputs", VLLM_KEYS[k], v) for k, v in value.items() if v is not None and v is not False]
