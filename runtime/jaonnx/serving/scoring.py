"""Scoring over HTTP: `POST /v1/score` (log-likelihood and perplexity of texts, e.g. to rank
or filter them) and `/v1/completions` with `echo` and `max_tokens: 0`, which returns the
prompt's token logprobs in OpenAI's shape (what lm-evaluation-harness sends).

Both run `TextGenerator.score` / `TextGenerator.prompt_logprobs` in a thread. Those use the
model's own decoder, never the one the generation worker drives; a per-model gate runs one
scoring call at a time and answers 503 when too many wait.
"""

# (no `from __future__ import annotations`: FastAPI must see the real `Request` class of the route)

import asyncio
import threading
from typing import Any

from pydantic import Field

from ..errors import JaonnxError
from .schemas import RequestError, Texts, StrictBody, parse, texts

MAX_TOP_LOGPROBS = 20


class ScoreRequest(StrictBody):
    """`/v1/score`: natural-log likelihoods of each text; the first token is not scored."""

    model: str
    input: Texts
    top_logprobs: int = Field(0, ge=0, le=MAX_TOP_LOGPROBS)


class ScoreGate:
    """One scoring call at a time per model; at most `max_waiting` more wait (else 503)."""

    def __init__(self, max_waiting: int) -> None:
        self.max_waiting = max(1, max_waiting)
        self._lock = threading.Lock()
        self._count = threading.Semaphore(self.max_waiting + 1)

    async def run(self, name: str, call: Any, *args: Any) -> Any:
        if not self._count.acquire(blocking=False):
            raise RequestError(503, f"model {name!r} has {self.max_waiting} scoring requests waiting: retry later",
                               None, "overloaded")
        try:
            return await asyncio.to_thread(self._locked, call, *args)
        finally:
            self._count.release()

    def _locked(self, call: Any, *args: Any) -> Any:
        with self._lock:
            return call(*args)


def _top(model: Any, top: dict[int, float]) -> dict[str, float]:
    return {model.tokenizer.token_str(t): lp for t, lp in top.items()}


def openai_logprobs(model: Any, prompt: str, top_k: int) -> tuple[dict[str, Any], int]:
    """OpenAI's `logprobs` object for an echoed prompt (first token: None), and its token count."""
    ids = model.encode(prompt)
    if len(ids) < 2:
        text = model.tokenizer.decode(ids)
        return {"tokens": [text], "token_logprobs": [None], "top_logprobs": [None] if top_k else None,
                "text_offset": [0]}, len(ids)
    lp = model.prompt_logprobs(prompt, top_k)
    top = [None, *(_top(model, t) for t in lp.top_logprobs)] if top_k else None
    return {"tokens": lp.tokens, "token_logprobs": [None, *lp.token_logprobs], "top_logprobs": top,
            "text_offset": lp.text_offset}, len(ids)


def score_items(model: Any, items: list[str], top_k: int, field: str) -> list[dict[str, Any]]:
    """`/v1/score`'s data: `TextGenerator.score`, plus the top-k alternatives if asked."""
    out = []
    for i, text in enumerate(items):
        where = field if len(items) == 1 else f"{field}[{i}]"
        try:
            result = model.score(text)
            top = model.prompt_logprobs(text, top_k).top_logprobs if top_k else None
        except JaonnxError as exc:
            raise RequestError(400, " ".join(str(exc).split()), where) from None
        item = {"index": i, "object": "score", **result.to_dict()}
        if top is not None:
            item["top_logprobs"] = [_top(model, t) for t in top]
        out.append(item)
    return out


def echo_items(model: Any, prompts: list[str], top_k: int | None, n: int) -> tuple[list[dict[str, Any]], int]:
    """Choices of an echo-only completion (max_tokens 0) and the prompt tokens counted once."""
    choices, prompt_tokens = [], 0
    for i, prompt in enumerate(prompts):
        try:
            if top_k is None:
                logprobs, count = None, len(model.encode(prompt))
            else:
                logprobs, count = openai_logprobs(model, prompt, top_k)
        except JaonnxError as exc:
            raise RequestError(400, " ".join(str(exc).split()), "prompt" if len(prompts) == 1 else f"prompt[{i}]") from None
        prompt_tokens += count
        for _ in range(n):
            choices.append({"text": prompt, "index": len(choices), "logprobs": logprobs, "finish_reason": "length"})
    return choices, prompt_tokens


async def echo_completion(m: Any, req: Any, prompts: list[str], gate: ScoreGate) -> dict[str, Any]:
    """`/v1/completions` with `max_tokens: 0`: only the echoed prompt, scored if `logprobs` is set."""
    import time
    import uuid

    if not req.echo:
        raise RequestError(422, "max_tokens: 0 generates nothing: set echo to true to score the prompt, "
                                "or ask for at least 1 token", "max_tokens")
    if req.stream:
        raise RequestError(400, "max_tokens: 0 (echo-only scoring) does not stream: set stream to false", "stream")
    for name in ("suffix", "logit_bias", "presence_penalty", "frequency_penalty"):
        if getattr(req, name):
            raise RequestError(400, f"{name} is not supported by this server: leave it out", name)
    choices, prompt_tokens = await gate.run(m.name, echo_items, m.model, prompts, req.logprobs, req.n or 1)
    return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
            "model": m.name, "choices": choices,
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": 0, "total_tokens": prompt_tokens}}


def score_router(served: dict[str, Any], gates: dict[str, ScoreGate], max_body_bytes: int) -> Any:
    """`POST /v1/score`."""
    from fastapi import APIRouter, Request

    from .validation import lookup, read_json

    router = APIRouter()

    @router.post("/v1/score", summary="Log-likelihood and perplexity of texts",
                 openapi_extra={"requestBody": {"required": True, "content": {
                     "application/json": {"schema": ScoreRequest.model_json_schema()}}}})
    async def score(request: Request) -> Any:
        req = parse(ScoreRequest, await read_json(request, max_body_bytes))
        m = lookup(served, req.model, "text-generation")
        items, _ = texts(req.input, "input")
        data = await gates[m.name].run(m.name, score_items, m.model, items, req.top_logprobs, "input")
        tokens = sum(d["num_tokens"] + 1 for d in data)
        return {"object": "list", "model": m.name, "data": data,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}

    return router
