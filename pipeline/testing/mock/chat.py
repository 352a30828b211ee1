"""The OpenAI shapes the mock speaks: a chat request parsed, a reply, an error body.

Only what a request queue relies on is checked (model, messages, max_tokens, stream and
its options); the reply echoes the last message so a test can tell replies apart, and is
the same words whether it is streamed or not, so a test can compare the two.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import Any

from aiohttp import web

__all__ = [
    "MAX_REPLY_TOKENS",
    "ChatRequest",
    "Reply",
    "RequestError",
    "completion",
    "error_response",
    "parse_chat_request",
    "reply_for",
    "retry_after_header",
]

_REPLY_PREFIX = "mock reply to: "
_ECHO_CHARS = 200
#: Words that pad a reply to ``reply_tokens`` (or ``max_tokens``) after the echo.
_FILLER = ("lorem", "ipsum", "dolor", "sit", "amet", "consectetur", "adipiscing", "elit")
_WORD = re.compile(r"\s*\S+")
#: A reply never has more tokens than this, whatever ``max_tokens`` asks.
MAX_REPLY_TOKENS = 65_536


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
    stream: bool = False
    include_usage: bool = False


@dataclass(frozen=True, slots=True)
class Reply:
    """A reply's tokens (words with the space before them: together they are its text)
    and why it ended."""

    tokens: tuple[str, ...]
    finish_reason: str
    prompt_tokens: int

    @property
    def text(self) -> str:
        """The whole reply, as a non-streamed completion carries it."""
        return "".join(self.tokens)

    def usage(self) -> dict[str, int]:
        """The OpenAI ``usage`` object of this reply."""
        completion_tokens = len(self.tokens)
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": self.prompt_tokens + completion_tokens,
        }


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


def _stream_flags(body: dict[str, Any]) -> tuple[bool, bool]:
    """``stream`` and ``stream_options.include_usage``, checked as vLLM checks them."""
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise _invalid("'stream' must be a boolean")
    options = body.get("stream_options")
    if options is None:
        return stream, False
    if not isinstance(options, dict):
        raise _invalid("'stream_options' must be an object")
    if not stream:
        raise _invalid("'stream_options' can only be given with 'stream': true")
    include_usage = options.get("include_usage", False)
    if not isinstance(include_usage, bool):
        raise _invalid("'stream_options.include_usage' must be a boolean")
    return stream, include_usage


def parse_chat_request(body: Any, models: tuple[str, ...]) -> ChatRequest:
    """Check a chat-completions body; raises :class:`RequestError` (400, or 404 for a
    model the mock does not serve)."""
    if not isinstance(body, dict):
        raise _invalid("request body must be a JSON object")
    stream, include_usage = _stream_flags(body)
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
    return ChatRequest(model=model, texts=texts, max_tokens=max_tokens, stream=stream,
                       include_usage=include_usage)


def _padded(words: list[str], count: int) -> list[str]:
    """``words`` cut or padded with filler words to exactly ``count``."""
    pad = (_FILLER[i % len(_FILLER)] for i in range(max(0, count - len(words))))
    return [*words[:count], *pad]


def _joined(words: list[str]) -> tuple[str, ...]:
    """Tokens of ``words`` joined by single spaces (each after the first leads with one)."""
    return tuple(word if i == 0 else " " + word for i, word in enumerate(words))


def _as_sent(text: str) -> tuple[str, ...]:
    """Tokens of ``text`` exactly as written: each word with the whitespace before it,
    any trailing whitespace on the last one, so that they add up to ``text``."""
    tokens = _WORD.findall(text)
    tail = text[len("".join(tokens)):]
    return (*tokens[:-1], tokens[-1] + tail) if tokens else ()


def reply_for(chat: ChatRequest, reply_tokens: int | None) -> Reply:
    """The reply's tokens: the echo of the last message, cut at ``max_tokens`` words; or,
    with ``reply_tokens`` set, exactly ``max_tokens`` (else ``reply_tokens``) words."""
    echo = _REPLY_PREFIX + chat.texts[-1][:_ECHO_CHARS]
    prompt_tokens = sum(len(text.split()) for text in chat.texts)
    if reply_tokens is not None:
        wanted = reply_tokens if chat.max_tokens is None else chat.max_tokens
        tokens = _joined(_padded(echo.split(), min(wanted, MAX_REPLY_TOKENS)))
        finish_reason = "stop" if chat.max_tokens is None else "length"
    elif chat.max_tokens is not None and len(echo.split()) > chat.max_tokens:
        tokens, finish_reason = _joined(echo.split()[: chat.max_tokens]), "length"
    else:
        tokens, finish_reason = _as_sent(echo), "stop"
    return Reply(tokens=tokens, finish_reason=finish_reason, prompt_tokens=prompt_tokens)


def completion(chat: ChatRequest, reply: Reply, completion_id: str) -> dict[str, Any]:
    """The ``chat.completion`` of a reply that is not streamed."""
    return {
        "id": completion_id,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": chat.model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": reply.text},
                "finish_reason": reply.finish_reason,
            }
        ],
        "usage": reply.usage(),
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
