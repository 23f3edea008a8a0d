"""Request bodies, validated strictly (no "5" for 5, no unknown fields, finite numbers only),
so that a bad request is a 4xx naming its field before any model work is queued.

Bounds here are about the protocol (non-negative, within int64, sane sizes); the model's own
limits (its positions, its vocabulary) are checked by the runtime and mapped to 400 as well.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model

from ..generation.options import GENERATION_OPTIONS, Option
from ..generation.spec import INT64, MAX_STOPS, MAX_TOKENS

MAX_ITEMS = 256  # texts or prompts in one request
MAX_TOKEN_IDS = 1 << 16  # ids in one /detokenize request
MAX_TOP_K = 100  # fill-mask predictions per mask
MAX_PREDICTIONS = 5000  # texts x masks x top_k in one fill-mask request: each is a decoded sequence


class StrictBody(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", protected_namespaces=())


Texts = str | list[str]


class FillMaskRequest(StrictBody):
    model: str
    inputs: Texts
    top_k: int = Field(5, ge=1, le=MAX_TOP_K)


def _field(option: Option) -> tuple[Any, Any]:
    """(annotation, Field) for one generation option: optional, with the table's bounds."""
    annotation: Any = option.type
    extra: dict[str, Any] = {}
    if option.type is float:
        extra["allow_inf_nan"] = False
    if option.name == "stop":
        annotation = str | list[str]
    if option.name == "json_schema":  # structured output: the schema as an object, or as JSON text
        annotation = dict[str, Any] | str
    return annotation | None, Field(None, ge=option.ge, gt=option.gt, le=option.le, description=option.help, **extra)


GenerateRequest = create_model(  # type: ignore[call-overload]
    "GenerateRequest",
    __base__=StrictBody,
    __doc__="`/v1/generate`: the Python API's options (GENERATION_OPTIONS); unset ones take the model card's defaults.",
    model=(str, ...),
    prompt=(Texts, ...),
    stream=(bool, False),
    **{o.name: _field(o) for o in GENERATION_OPTIONS if o.http},
)
EXTENSIONS = {o.name: o for o in GENERATION_OPTIONS if o.name in ("top_k", "repetition_penalty")}


class CompletionRequest(StrictBody):
    """OpenAI's `/v1/completions`. `temperature: 0` (or `top_p: 0`) means greedy; `top_k` and
    `repetition_penalty` are extensions (off by default, as OpenAI has neither)."""

    model: str
    prompt: Texts
    max_tokens: int | None = Field(16, ge=0, le=MAX_TOKENS)  # 0: echo-only scoring (with echo)
    temperature: float | None = Field(1.0, ge=0, le=2, allow_inf_nan=False)
    top_p: float | None = Field(1.0, ge=0, le=1, allow_inf_nan=False)
    n: int | None = Field(1, ge=1, le=64)
    stream: bool | None = False
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, le=INT64)
    echo: bool | None = False
    user: str | None = None
    best_of: int | None = Field(None, ge=1, le=64)
    logprobs: int | None = Field(None, ge=0, le=5)
    presence_penalty: float | None = Field(0.0, ge=-2, le=2, allow_inf_nan=False)
    frequency_penalty: float | None = Field(0.0, ge=-2, le=2, allow_inf_nan=False)
    logit_bias: dict[str, float] | None = None
    suffix: str | None = None
    stream_options: dict[str, bool] | None = None
    top_k: int = Field(0, ge=EXTENSIONS["top_k"].ge, le=EXTENSIONS["top_k"].le)
    repetition_penalty: float = Field(
        1.0, gt=EXTENSIONS["repetition_penalty"].gt, le=EXTENSIONS["repetition_penalty"].le, allow_inf_nan=False
    )
    # Structured output (serving/structured.py): OpenAI's response_format, vLLM's fields.
    response_format: dict[str, Any] | None = None
    structured_outputs: dict[str, Any] | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None

    @property
    def greedy(self) -> bool:
        """`temperature: 0` or `top_p: 0` (OpenAI's way to ask for greedy decoding)."""
        return self.temperature == 0 or self.top_p == 0

    def to_options(self) -> dict[str, Any]:
        """The runtime's generation options (GENERATION_OPTIONS names) for this request.

        Greedy copies are identical, so for a greedy request `n` is made by repeating the
        prompt (the caller's job), not by `num_return_sequences`. With `echo`, `logprobs` also
        asks for the prompt's log-probabilities (`prompt_logprobs`)."""
        return {
            "max_new_tokens": self.max_tokens or 16, "min_new_tokens": 0, "do_sample": not self.greedy,
            "temperature": 1.0 if self.temperature is None else self.temperature,
            "top_p": self.top_p or 1.0, "top_k": self.top_k, "repetition_penalty": self.repetition_penalty,
            "num_return_sequences": 1 if self.greedy else (self.n or 1), "seed": self.seed, "logprobs": self.logprobs,
            "prompt_logprobs": self.logprobs if self.echo else None, "stop": stops(self.stop),
        }


class RequestError(Exception):
    """A client error: HTTP status, one-line message, and the request field at fault."""

    def __init__(self, status: int, message: str, field: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.field, self.kind = status, message, field, kind


def error_body(message: str, field: str | None, kind: str, status: int) -> dict[str, Any]:
    """OpenAI's error shape (`message`, `type`, `param`, `code`) plus `field`."""
    return {"error": {"message": message, "type": kind, "field": field, "param": field, "code": status}}


def field_name(loc: tuple[Any, ...]) -> str:
    """('inputs', 'list[str]', 3) -> 'inputs[3]'; () -> 'body'."""
    if not loc:
        return "body"
    name = str(loc[0])
    return name + "".join(f"[{part}]" for part in loc[1:] if isinstance(part, int))


def parse(model: type[StrictBody], data: Any) -> Any:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        errors = exc.errors()  # for a union, the branch that got furthest (an item index) says most
        first = max(errors, key=lambda e: sum(isinstance(part, int) for part in e["loc"]))
        field = field_name(tuple(first["loc"]))
        raise RequestError(422, f"{field}: {first['msg']}", field) from None


def texts(value: Texts, field: str, limit: int = MAX_ITEMS) -> tuple[list[str], bool]:
    """A str or a non-empty list of str -> (list, whether a single str was given)."""
    if isinstance(value, str):
        return [value], True
    if not value:
        raise RequestError(422, f"{field} is an empty list: give at least one text", field)
    if len(value) > limit:
        raise RequestError(413, f"{field} has {len(value)} items; at most {limit} per request", field)
    return list(value), False


def stops(value: str | list[str] | None) -> tuple[str, ...]:
    items = [value] if isinstance(value, str) else list(value or [])
    if len(items) > MAX_STOPS:
        raise RequestError(422, f"stop takes at most {MAX_STOPS} sequences", "stop")
    if any(not s for s in items):
        raise RequestError(422, "stop sequences must be non-empty strings", "stop")
    return tuple(items)
