"""The OpenAI shapes the mock speaks: a chat request parsed, a completion, an error body.

Only what a request queue relies on is checked (model, messages, max_tokens, no
streaming); the completion echoes the last message so a test can tell replies apart.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from aiohttp import web

__all__ = [
    "ChatRequest",
    "RequestError",
    "completion",
    "error_response",
    "parse_chat_request",
    "retry_after_header",
]

_REPLY_PREFIX = "mock reply to: "
_ECHO_CHARS = 200


class RequestError(Exception):
    """A client error to answer in the OpenAI error shape."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


def _invalid(message: str) -> RequestError:
    return RequestError(400, "invalid_request", message)


@dataclass(frozen=True, slots=True)
class ChatRequest:
    """The parts of a chat request the mock answers from."""

    model: str
    texts: tuple[str, ...]
    max_tokens: int | None


def _part_text(part: Any, index: int) -> str | None:
    if not isinstance(part, dict):
        raise _invalid(f"messages[{index}].content parts must be objects")
    if part.get("type") != "text":
        return None
    text = part.get("text")
    if not isinstance(text, str):
        raise _invalid(f"messages[{index}] text part needs a string 'text'")
    return text


def _content_text(content: Any, index: int) -> str:
    """Flatten a message's content (string, list of parts, or null) to plain text."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = (_part_text(part, index) for part in content)
        return " ".join(text for text in texts if text is not None)
    raise _invalid(f"messages[{index}].content must be a string or a list of parts")


def _message_texts(messages: Any) -> tuple[str, ...]:
    if not isinstance(messages, list) or not messages:
        raise _invalid("'messages' must be a non-empty list")
    texts: list[str] = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise _invalid(f"messages[{i}] must be an object")
        texts.append(_content_text(message.get("content"), i))
    return tuple(texts)


def parse_chat_request(body: Any, models: tuple[str, ...]) -> ChatRequest:
    """Check a chat-completions body; raises :class:`RequestError` (400, or 404 for a
    model the mock does not serve)."""
    if not isinstance(body, dict):
        raise _invalid("request body must be a JSON object")
    if body.get("stream") is True:
        raise _invalid("streaming is not supported by the mock")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _invalid("'model' is required and must be a string")
    texts = _message_texts(body.get("messages"))
    max_tokens = body.get("max_tokens", body.get("max_completion_tokens"))
    if max_tokens is not None and (
        isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1
    ):
        raise _invalid("'max_tokens' must be a positive integer")
    if model not in models:
        raise RequestError(404, "model_not_found", f"model {model!r} does not exist")
    return ChatRequest(model=model, texts=texts, max_tokens=max_tokens)


def completion(chat: ChatRequest, completion_id: str) -> dict[str, Any]:
    """A ``chat.completion`` echoing the last message, cut at ``max_tokens`` words."""
    reply = _REPLY_PREFIX + chat.texts[-1][:_ECHO_CHARS]
    finish_reason = "stop"
    words = reply.split()
    if chat.max_tokens is not None and len(words) > chat.max_tokens:
        words = words[: chat.max_tokens]
        reply = " ".join(words)
        finish_reason = "length"
    prompt_tokens = sum(len(text.split()) for text in chat.texts)
    completion_tokens = len(words)
    return {
        "id": completion_id,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": chat.model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": reply},
                "finish_reason": finish_reason,
            }
        ],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    }


def error_response(
    status: int, code: str | None, message: str, *, type_: str = "invalid_request_error",
    headers: dict[str, str] | None = None,
) -> web.Response:
    """An OpenAI-shaped error body with ``status``."""
    return web.json_response(
        {"error": {"type": type_, "code": code, "message": message}},
        status=status,
        headers=headers,
    )


def retry_after_header(seconds: float) -> str:
    """Integral values as plain integers ("1"), as most servers send them."""
    return str(int(seconds)) if float(seconds).is_integer() else f"{seconds:g}"
