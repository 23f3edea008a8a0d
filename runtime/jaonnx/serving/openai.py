"""OpenAI's `/v1/completions`: request options in, response bodies and stream chunks out."""

from __future__ import annotations

from typing import Any

from .batcher import GenerationJob
from .events import EventMaker
from .schemas import CompletionRequest
from .scoring import openai_logprobs

ALIASES = {"max_new_tokens": "max_tokens", "num_return_sequences": "n"}  # runtime name -> OpenAI's


def completion_options(req: CompletionRequest) -> tuple[dict[str, Any], bool]:
    """The runtime's generation options for an OpenAI request, and whether it is greedy
    (`temperature: 0` or `top_p: 0`; greedy copies are identical, so `n` rows are made by
    repeating the prompt rather than by sampling)."""
    greedy = req.temperature == 0 or req.top_p == 0
    options: dict[str, Any] = {
        "max_new_tokens": req.max_tokens or 16, "min_new_tokens": 0, "do_sample": not greedy,
        "temperature": 1.0 if req.temperature is None else req.temperature,
        "top_p": req.top_p or 1.0, "top_k": req.top_k, "repetition_penalty": req.repetition_penalty,
        "num_return_sequences": 1 if greedy else (req.n or 1), "seed": req.seed, "logprobs": req.logprobs,
    }
    return options, greedy


def choice_logprobs(model: Any, result: dict[str, Any], echo: bool, top: int) -> dict[str, Any]:
    """OpenAI's `logprobs` object of one choice: each generated token's text, log-probability,
    `top` alternatives and offset in the choice's text; with `echo`, the prompt's tokens first
    (its first token has no log-probability)."""
    generated = result["generated_ids"]
    tokens = model.token_texts(generated, context=result["prompt_ids"])
    lps = result.get("logprobs") or []
    body: dict[str, Any] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    start = 0
    if echo:
        prompt, _ = openai_logprobs(model, result["prompt"], top)
        for key in body:
            body[key] += prompt[key] or [None] * len(prompt["tokens"])
        start = len(result["prompt"])
    offsets = [start + sum(len(t) for t in tokens[:i]) for i in range(len(tokens))]
    body["tokens"] += tokens
    body["token_logprobs"] += [lp["logprob"] for lp in lps]
    body["top_logprobs"] += [{model.tokenizer.token_str(t): v for t, v in lp["top"]} for lp in lps]
    body["text_offset"] += offsets
    return body


FINISH = {"eos": "stop", "stop": "stop", "length": "length", "error": "error"}  # error: a constraint failed


def completion_body(
    meta: dict[str, Any], results: list[dict[str, Any]], echo: bool, n: int, model: Any = None, logprobs: int | None = None
) -> dict[str, Any]:
    choices = [
        {"text": (r["prompt"] if echo else "") + r["text"], "index": i,
         "logprobs": None if logprobs is None else choice_logprobs(model, r, echo, logprobs),
         "finish_reason": FINISH[r["finish_reason"]]}
        for i, r in enumerate(results)
    ]
    return {"object": "text_completion", **meta, "choices": choices, "usage": usage(results, n)}


def usage(results: list[dict[str, Any]], n: int) -> dict[str, int]:
    """Token counts; each prompt counts once, however many choices (`n`) it has."""
    prompt_tokens = sum(len(r["prompt_ids"]) for r in results[::n])
    completion_tokens = sum(len(r["generated_ids"]) for r in results)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_events(meta: dict[str, Any], echo: bool, include_usage: bool, n: int) -> EventMaker:
    def chunk(choices: list[Any], **extra: Any) -> dict[str, Any]:
        return {"object": "text_completion", **meta, "choices": choices, **extra}

    def choice(index: int, text: str, finish: str | None = None) -> dict[str, Any]:
        return {"text": text, "index": index, "logprobs": None, "finish_reason": finish}

    def make(kind: str, payload: Any) -> list[Any]:
        if kind == "start":
            job: GenerationJob = payload
            return [chunk([choice(i, job.prompts[i // job.n])]) for i in range(job.rows)] if echo else []
        if kind == "piece":
            row, text = payload
            return [chunk([choice(row, text)])]
        if kind == "result":
            out = [chunk([choice(i, "", FINISH[r["finish_reason"]])]) for i, r in enumerate(payload)]
            if include_usage:
                out.append(chunk([], usage=usage(payload, n)))
            return out
        return []

    return make
