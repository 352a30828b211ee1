"""The mock's ``/v1/completions`` and ``/v1/embeddings``: deterministic answers with usage.

Like a chat request, each waits FIFO for a slot and holds it for the latency, and a client
that goes away is counted as ``aborted``. A text completion echoes the prompt (the same
words as a chat reply to that prompt); an embedding is 8 numbers derived from the input's
SHA-256, so equal inputs get equal vectors and a test can check them.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from aiohttp import web

from pipeline.testing.mock.chat import (
    ChatRequest,
    RequestError,
    error_response,
    reply_for,
)

if TYPE_CHECKING:
    from pipeline.testing.mock.server import MockBackend

__all__ = ["PATHS", "completion_answer", "embedding_of", "embeddings_answer", "handler"]

#: The paths this module serves.
PATHS = ("/v1/completions", "/v1/embeddings")
#: Numbers per embedding vector.
DIMENSIONS = 8


def _invalid(message: str) -> RequestError:
    return RequestError(400, "invalid_request", message)


def _model(body: Any, models: tuple[str, ...]) -> str:
    if not isinstance(body, dict):
        raise _invalid("request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _invalid("'model' is required and must be a string")
    if model not in models:
        raise RequestError(404, "model_not_found", f"model {model!r} does not exist")
    return model


def _texts(value: Any, name: str) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        return list(value)
    raise _invalid(f"'{name}' must be a string or a non-empty list of strings")


def completion_answer(body: Any, models: tuple[str, ...], reply_tokens: int | None,
                      completion_id: str) -> dict[str, Any]:
    """The ``text_completion`` of a completions body."""
    model = _model(body, models)
    prompts = _texts(body.get("prompt"), "prompt")
    max_tokens = body.get("max_tokens")
    if max_tokens is not None and (isinstance(max_tokens, bool)
                                   or not isinstance(max_tokens, int) or max_tokens < 1):
        raise _invalid("'max_tokens' must be a positive integer")
    choices, prompt_tokens, completion_tokens = [], 0, 0
    for index, prompt in enumerate(prompts):
        reply = reply_for(ChatRequest(model, (prompt,), max_tokens), reply_tokens)
        choices.append({"index": index, "text": reply.text, "logprobs": None,
                        "finish_reason": reply.finish_reason})
        prompt_tokens += reply.prompt_tokens
        completion_tokens += len(reply.tokens)
    return {"id": completion_id, "object": "text_completion", "created": int(time.time()),
            "model": model, "choices": choices,
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens}}


def embedding_of(text: str) -> list[float]:
    """The mock's embedding of ``text``: deterministic, in [-1, 1]."""
    digest = hashlib.sha256(text.encode()).digest()
    return [round(b / 127.5 - 1.0, 6) for b in digest[:DIMENSIONS]]


def embeddings_answer(body: Any, models: tuple[str, ...]) -> dict[str, Any]:
    """The embeddings ``list`` of an embeddings body."""
    model = _model(body, models)
    texts = _texts(body.get("input"), "input")
    tokens = sum(len(text.split()) for text in texts)
    return {"object": "list", "model": model,
            "data": [{"object": "embedding", "index": i, "embedding": embedding_of(text)}
                     for i, text in enumerate(texts)],
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}


def handler(backend: MockBackend) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    """The handler of :data:`PATHS` on ``backend`` (its slots, latency and counters)."""

    async def handle(request: web.Request) -> web.StreamResponse:
        try:
            body = await request.json()
            if request.path.endswith("/embeddings"):
                answer = embeddings_answer(body, backend.config.models)
            else:
                answer = completion_answer(body, backend.config.models,
                                           backend.config.reply_tokens,
                                           backend.next_id("cmpl-mock"))
        except RequestError as exc:
            return error_response(exc.status, exc.code, exc.message)
        except ValueError:
            return error_response(400, "invalid_request", "request body is not valid JSON")
        request_id = request.headers.get("X-Request-Id")
        try:
            async with backend._slot():
                await asyncio.sleep(backend.config.latency_ms / 1000.0)
        except asyncio.CancelledError:
            backend._counters.abort(request_id)
            raise
        backend._counters.serve(request_id)
        headers = {} if request_id is None else {"X-Request-Id": request_id}
        return web.json_response(answer, headers=headers)

    return handle
