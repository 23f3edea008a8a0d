"""OpenAI's `/v1/completions`: typed results in, response bodies and stream chunks out.

The worker hands over `GenerationResult`s and `Piece`s; this module alone turns them into
OpenAI's JSON (choices, `logprobs` objects, usage), streamed or not."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..generation import GENERATION_OPTIONS, GenerationResult, TokenLogprob
from .batcher import GenerationJob, Piece
from .events import EventMaker

ALIASES = {o.name: o.openai for o in GENERATION_OPTIONS if o.openai}  # runtime name -> OpenAI's (the option table)
FINISH = {"eos": "stop", "stop": "stop", "length": "length", "error": "error"}  # error: a constraint failed


def _top(model: Any, lp: TokenLogprob) -> dict[str, float]:
    return {model.tokenizer.token_str(t): v for t, v in lp.top}


def prompt_logprobs_body(model: Any, result: GenerationResult, top: int) -> dict[str, Any]:
    """OpenAI's `logprobs` object for an echoed prompt: its first token has no log-probability."""
    lp = model.prompt_logprobs_result(result)
    entries = result.prompt_logprobs or []
    return {"tokens": lp.tokens, "token_logprobs": [None, *lp.token_logprobs],
            "top_logprobs": [None, *(_top(model, e) for e in entries)] if top else None,
            "text_offset": lp.text_offset}


def generated_logprobs(model: Any, ids: Sequence[int], context: Sequence[int], lps: Sequence[TokenLogprob],
                       start: int) -> dict[str, Any]:
    """The `logprobs` lists of generated tokens `ids` after `context`; offsets from `start`."""
    tokens = model.token_texts(list(ids), context=list(context))
    offsets, at = [], start
    for t in tokens:
        offsets.append(at)
        at += len(t)
    return {"tokens": tokens, "token_logprobs": [lp.logprob for lp in lps],
            "top_logprobs": [_top(model, lp) for lp in lps], "text_offset": offsets}


def choice_logprobs(model: Any, result: GenerationResult, echo: bool, top: int) -> dict[str, Any]:
    """OpenAI's `logprobs` object of one choice: each generated token's text, log-probability,
    `top` alternatives and offset in the choice's text; with `echo`, the prompt's tokens first
    (the engine scored them: `prompt_logprobs`)."""
    body: dict[str, Any] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    start = 0
    if echo:
        prompt = prompt_logprobs_body(model, result, top)
        for key in body:
            body[key] += prompt[key] or [None] * len(prompt["tokens"])
        start = len(result.prompt)
    gen = generated_logprobs(model, result.generated_ids, result.prompt_ids, result.logprobs or [], start)
    for key in body:
        body[key] += gen[key]
    return body


def completion_body(meta: dict[str, Any], results: list[GenerationResult], echo: bool, n: int, model: Any = None,
                    logprobs: int | None = None) -> dict[str, Any]:
    choices = [
        {"text": (r.prompt if echo else "") + r.text, "index": i,
         "logprobs": None if logprobs is None else choice_logprobs(model, r, echo, logprobs),
         "finish_reason": FINISH[r.finish_reason]}
        for i, r in enumerate(results)
    ]
    return {"object": "text_completion", **meta, "choices": choices, "usage": usage(results, n)}


def echo_body(meta: dict[str, Any], results: list[GenerationResult], n: int, model: Any,
              logprobs: int | None) -> dict[str, Any]:
    """`max_tokens: 0` with `echo`: each prompt echoed `n` times, scored if `logprobs` is set
    (the token the engine generated alongside is not part of the answer)."""
    choices = []
    for r in results:
        body = None if logprobs is None else prompt_logprobs_body(model, r, logprobs)
        for _ in range(n):
            choices.append({"text": r.prompt, "index": len(choices), "logprobs": body, "finish_reason": "length"})
    prompt_tokens = sum(len(r.prompt_ids) for r in results)
    return {"object": "text_completion", **meta, "choices": choices,
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": 0, "total_tokens": prompt_tokens}}


def usage(results: list[GenerationResult], n: int) -> dict[str, int]:
    """Token counts; each prompt counts once, however many choices (`n`) it has."""
    prompt_tokens = sum(len(r.prompt_ids) for r in results[::n])
    completion_tokens = sum(len(r.generated_ids) for r in results)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_events(meta: dict[str, Any], echo: bool, include_usage: bool, n: int, model: Any = None,
                      logprobs: int | None = None) -> EventMaker:
    """OpenAI's stream chunks. With `logprobs`, each chunk carries the `logprobs` of its tokens
    (joined, they equal the non-streamed object); with `echo` too, the echoed prompt's chunk
    comes with the prompt's first piece, scored."""
    offsets: dict[int, int] = {}  # row -> where its next token starts in the choice's text
    prompts: dict[int, str] = {}  # row -> its prompt's text

    def chunk(choices: list[Any], **extra: Any) -> dict[str, Any]:
        return {"object": "text_completion", **meta, "choices": choices, **extra}

    def choice(index: int, text: str, finish: str | None = None, lps: Any = None) -> dict[str, Any]:
        return {"text": text, "index": index, "logprobs": lps, "finish_reason": finish}

    def make(kind: str, payload: Any) -> list[Any]:
        if kind == "start":
            job: GenerationJob = payload
            for row in range(job.rows):
                prompts[row] = job.texts[row // job.n]
                offsets[row] = len(prompts[row]) if echo else 0
            if not echo or logprobs is not None:
                return []
            return [chunk([choice(i, job.texts[i // job.n])]) for i in range(job.rows)]
        if kind == "piece":
            piece: Piece = payload
            out = []
            if echo and logprobs is not None and piece.prompt_logprobs is not None:
                # a row's first piece: its context is the prompt
                prompt = GenerationResult(prompts[piece.row], "", piece.context_ids, [], "length",
                                          prompt_logprobs=piece.prompt_logprobs)
                out.append(chunk([choice(piece.row, prompt.prompt, None, prompt_logprobs_body(model, prompt, logprobs))]))
            lps = None
            if logprobs is not None:
                lps = generated_logprobs(model, piece.token_ids, piece.context_ids, piece.logprobs or [],
                                         offsets.get(piece.row, 0))
                offsets[piece.row] = offsets.get(piece.row, 0) + sum(len(t) for t in lps["tokens"])
            out.append(chunk([choice(piece.row, piece.text, None, lps)]))
            return out
        if kind == "result":
            results: list[GenerationResult] = payload
            out = [chunk([choice(i, "", FINISH[r.finish_reason])]) for i, r in enumerate(results)]
            if include_usage:
                out.append(chunk([], usage=usage(results, n)))
            return out
        return []

    return make
