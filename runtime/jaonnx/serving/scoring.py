"""Scoring over HTTP: `POST /v1/score` (log-likelihood and perplexity of texts, e.g. to rank
or filter them) and `/v1/completions` with `echo` and `max_tokens: 0`, which returns the
prompt's token logprobs in OpenAI's shape (what lm-evaluation-harness sends).

Both are engine requests with `prompt_logprobs` (`TextGenerator.scoring_inputs`), run by
the model's generation worker like any other request: batched with generation, bounded by
the same queue, and never computed on the event loop.
"""

# (no `from __future__ import annotations`: FastAPI must see the real `Request` class of the route)

import asyncio
import time
import uuid
from typing import Any

from pydantic import Field

from ..generation import GenerationResult
from ..generation.spec import MAX_LOGPROBS
from .batcher import GenerationJob
from .events import run
from .openai import echo_body
from .schemas import RequestError, StrictBody, Texts, parse, texts
from .validation import prepare

MAX_TOP_LOGPROBS = MAX_LOGPROBS


class ScoreRequest(StrictBody):
    """`/v1/score`: natural-log likelihoods of each text; the first token is not scored."""

    model: str
    input: Texts
    top_logprobs: int = Field(0, ge=0, le=MAX_TOP_LOGPROBS)


async def run_chunks(request: Any, worker: Any, job: GenerationJob, config: Any) -> Any:
    """Run a scoring job in parts of at most `max_batch_size` texts, one after another (a
    request may score more texts than one batch holds); their results in order, or the
    response to send instead (the client went away)."""
    size = config.max_batch_size
    results: list[GenerationResult] = []
    for start in range(0, len(job.inputs), size):
        part = GenerationJob(sink=job.sink, inputs=job.inputs[start : start + size], scoring=job.scoring)
        got = await run(request, worker, part, config.request_timeout)
        if not isinstance(got, list):
            return got
        results += got
    return results


def score_body(model: Any, name: str, results: list[GenerationResult], top_k: int) -> dict[str, Any]:
    """`/v1/score`'s response from the engine's results."""
    data = []
    for i, r in enumerate(results):
        item = {"index": i, "object": "score", **model.score_result(r).to_dict()}
        if top_k:
            item["top_logprobs"] = [{model.tokenizer.token_str(t): v for t, v in lp.top} for lp in r.prompt_logprobs]
        data.append(item)
    tokens = sum(d["num_tokens"] + 1 for d in data)
    return {"object": "list", "model": name, "data": data, "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}


async def echo_completion(request: Any, m: Any, req: Any, prompts: list[str], config: Any) -> Any:
    """`/v1/completions` with `max_tokens: 0`: only the echoed prompt, scored if `logprobs` is set."""
    if not req.echo:
        raise RequestError(422, "max_tokens: 0 generates nothing: set echo to true to score the prompt, "
                                "or ask for at least 1 token", "max_tokens")
    if req.stream:
        raise RequestError(400, "max_tokens: 0 (echo-only scoring) does not stream: set stream to false", "stream")
    for name in ("suffix", "logit_bias", "presence_penalty", "frequency_penalty"):
        if getattr(req, name):
            raise RequestError(400, f"{name} is not supported by this server: leave it out", name)
    meta = {"id": f"cmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": m.name}
    top = req.logprobs or 0
    job = await asyncio.to_thread(prepare, m.model, prompts, {"at_least": 1}, {}, False, scoring=top)
    if req.logprobs is None:  # nothing to compute: the prompts' token counts are known
        results = [GenerationResult(p.text, "", list(p.ids), [], "length") for p in job.inputs]
    else:
        results = await run_chunks(request, m.worker, job, config)
        if not isinstance(results, list):
            return results  # the client went away
    return await asyncio.to_thread(echo_body, meta, results, req.n or 1, m.model, req.logprobs)


def score_router(served: dict[str, Any], config: Any) -> Any:
    """`POST /v1/score`."""
    from fastapi import APIRouter, Request

    from .validation import lookup, read_json

    router = APIRouter()

    @router.post("/v1/score", summary="Log-likelihood and perplexity of texts",
                 openapi_extra={"requestBody": {"required": True, "content": {
                     "application/json": {"schema": ScoreRequest.model_json_schema()}}}})
    async def score(request: Request) -> Any:
        req = parse(ScoreRequest, await read_json(request, config.max_body_bytes))
        m = lookup(served, req.model, "text-generation")
        items, _ = texts(req.input, "input")
        job = await asyncio.to_thread(prepare, m.model, items, {}, {}, False, scoring=req.top_logprobs,
                                      prompt_field="input")
        results = await run_chunks(request, m.worker, job, config)
        if not isinstance(results, list):
            return results  # the client went away
        return await asyncio.to_thread(score_body, m.model, m.name, results, req.top_logprobs)

    return router
