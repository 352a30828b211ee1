"""The OpenAI chat-completions shapes Hutch reads and returns.

Only what Hutch itself relies on is typed; every other field is kept as sent
(``extra="allow"``), so a backend sees the request the application wrote and the
application sees the completion the backend wrote.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool

__all__ = [
    "ChatCompletion",
    "ChatCompletionChunk",
    "ChatMessage",
    "ChatRequest",
    "Choice",
    "ChunkChoice",
    "ChunkDelta",
    "CompletionRequest",
    "Embedding",
    "EmbeddingList",
    "EmbeddingsRequest",
    "ErrorDetail",
    "ErrorReply",
    "StreamOptions",
    "TextChoice",
    "TextCompletion",
    "Usage",
]


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


class ChatMessage(_Open):
    role: str = Field(min_length=1)
    content: str | list[Any] | None = None


class StreamOptions(_Open):
    """``stream_options``: only ``include_usage`` is read (strictly a boolean)."""

    include_usage: StrictBool = False


class ChatRequest(_Open):
    """An OpenAI ``/v1/chat/completions`` request body."""

    model: str = Field(min_length=1, max_length=255)
    messages: list[ChatMessage] = Field(min_length=1)
    #: Strict: ``"stream": "yes"`` is a client bug to refuse, not a truthy string.
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)


class CompletionRequest(_Open):
    """An OpenAI ``/v1/completions`` (legacy text completion) request body."""

    model: str = Field(min_length=1, max_length=255)
    prompt: str | list[Any]
    stream: StrictBool = False
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)


class EmbeddingsRequest(_Open):
    """An OpenAI ``/v1/embeddings`` request body."""

    model: str = Field(min_length=1, max_length=255)
    input: str | list[Any] = Field(min_length=1)


class Usage(_Open):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class Choice(_Open):
    index: int = 0
    message: ChatMessage
    finish_reason: str | None = None


class ChatCompletion(_Open):
    """An OpenAI ``chat.completion`` object, as the backend returned it."""

    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = 0
    model: str
    choices: list[Choice]
    usage: Usage | None = None


class TextChoice(_Open):
    index: int = 0
    text: str
    finish_reason: str | None = None


class TextCompletion(_Open):
    """An OpenAI ``text_completion`` object (the answer of ``/v1/completions``)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    model: str
    choices: list[TextChoice]
    usage: Usage | None = None


class Embedding(_Open):
    index: int = 0
    embedding: list[float] | str


class EmbeddingList(_Open):
    """The answer of ``/v1/embeddings``: a list of embeddings (vectors, or base64)."""

    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str = ""
    usage: Usage | None = None


class ChunkDelta(_Open):
    role: str | None = None
    content: str | None = None


class ChunkChoice(_Open):
    index: int = 0
    delta: ChunkDelta = Field(default_factory=ChunkDelta)
    finish_reason: str | None = None


class ChatCompletionChunk(_Open):
    """An OpenAI ``chat.completion.chunk`` object, one event of a stream."""

    id: str = ""
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = 0
    model: str = ""
    choices: list[ChunkChoice] = Field(default_factory=list)
    usage: Usage | None = None


class ErrorDetail(_Open):
    type: str
    code: str
    message: str


class ErrorReply(BaseModel):
    """The body of every error reply: ``{"error": {"type", "code", "message"}}``."""

    error: ErrorDetail
