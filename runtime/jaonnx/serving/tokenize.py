"""`POST /tokenize` and `POST /detokenize`, in the shapes of llama.cpp's server and vLLM's.

llama.cpp sends `{"content": ...}` (and `with_pieces`) and reads `tokens`/`content`; vLLM
sends `{"model", "prompt"}` and reads `tokens`, `count`, `max_model_len`/`prompt`. One body
schema takes either; the answer carries both sets of fields. Token ids are exactly what
`TextGenerator.encode` gives a prompt, so a client can count a prompt's tokens as the model
will see them. `model` may be left out when one generation model is served.
"""

# (no `from __future__ import annotations`: FastAPI must see the real `Request` class of the routes)

import asyncio
from typing import Any

from pydantic import Field

from .schemas import MAX_TOKEN_IDS, RequestError, StrictBody, parse


class TokenizeRequest(StrictBody):
    """llama.cpp's `content` or vLLM's `prompt` (one of them)."""

    model: str | None = None
    content: str | None = None
    prompt: str | None = None
    with_pieces: bool = False
    add_special: bool = True  # llama.cpp's name
    add_special_tokens: bool = True  # vLLM's name
    return_token_strs: bool = False  # vLLM


class DetokenizeRequest(StrictBody):
    model: str | None = None
    tokens: list[int] = Field(..., max_length=MAX_TOKEN_IDS)


def _model(served: dict[str, Any], name: str | None) -> Any:
    from .validation import lookup

    if name is not None:
        return lookup(served, name, "text-generation")
    generators = [m for m in served.values() if m.task == "text-generation"]
    if len(generators) != 1:
        raise RequestError(400, f"{len(generators)} generation models are served here: name one in model", "model")
    return generators[0]


def tokenize_body(model: Any, req: TokenizeRequest) -> dict[str, Any]:
    if (req.content is None) == (req.prompt is None):
        raise RequestError(400, "give the text as content (llama.cpp) or prompt (vLLM), not both or neither",
                           "content" if req.content is not None else "prompt")
    for name in ("add_special", "add_special_tokens"):
        if not getattr(req, name):
            raise RequestError(400, f"{name}: false is not supported: ids are always as the model's prompts are "
                                    "encoded", name)
    ids = model.tokenizer.encode_text(req.content if req.content is not None else req.prompt)
    pieces = [model.tokenizer.token_str(t) for t in ids] if req.with_pieces or req.return_token_strs else None
    body: dict[str, Any] = {
        "tokens": [{"id": t, "piece": p} for t, p in zip(ids, pieces)] if req.with_pieces and pieces is not None else ids,
        "count": len(ids), "max_model_len": model.manifest.max_positions,
    }
    if req.return_token_strs:
        body["token_strs"] = pieces
    return body


def detokenize_body(model: Any, req: DetokenizeRequest) -> dict[str, Any]:
    size = model.tokenizer.vocab_size
    for i, t in enumerate(req.tokens):
        if not 0 <= t < size:
            raise RequestError(400, f"token id {t} is not in [0, {size})", f"tokens[{i}]")
    text = model.tokenizer.decode(list(req.tokens))
    return {"content": text, "prompt": text}


def tokenize_router(served: dict[str, Any], config: Any) -> Any:
    """`POST /tokenize` and `POST /detokenize`."""
    from fastapi import APIRouter, Request

    from .validation import read_json

    router = APIRouter()

    @router.post("/tokenize", summary="Token ids of a text (llama.cpp's and vLLM's shapes)")
    async def tokenize(request: Request) -> Any:
        req = parse(TokenizeRequest, await read_json(request, config.max_body_bytes))
        m = _model(served, req.model)
        return await asyncio.to_thread(tokenize_body, m.model, req)

    @router.post("/detokenize", summary="The text of token ids (llama.cpp's and vLLM's shapes)")
    async def detokenize(request: Request) -> Any:
        req = parse(DetokenizeRequest, await read_json(request, config.max_body_bytes))
        m = _model(served, req.model)
        return await asyncio.to_thread(detokenize_body, m.model, req)

    return router
