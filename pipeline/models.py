"""The OpenAI chat-completions shapes Hutch reads and returns.

Only what Hutch itself relies on is typed; every other field is kept as sent
(``extra="allow"``), so a backend sees the request the application wrote and the
application sees the completion the backend wrote.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StrictBool, field_validator

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
    "QueueStatus",
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


#: Strict numbers: a JSON string is a client bug to refuse here, not a value to pass on (a
#: server that trips over ``"top_p": "bad"`` answers 500, which looks like the backend's
#: fault and would open its circuit for everyone).
_Float = Annotated[float, Field(strict=True)]
_Int = Annotated[int, Field(strict=True)]
#: ``stream``: strictly a boolean (``"stream": "yes"`` is a client bug to refuse, not a
#: truthy string), or null, which OpenAI's schema allows and means false.
_Stream = Annotated[StrictBool, BeforeValidator(lambda value: False if value is None else value)]


class ChatRequest(_Open):
    """An OpenAI ``/v1/chat/completions`` request body. The fields whose types OpenAI
    defines are checked here, before any backend call; every other field passes as sent."""

    model: str = Field(min_length=1, max_length=255)
    messages: list[ChatMessage] = Field(min_length=1)
    stream: _Stream = False
    stream_options: StreamOptions | None = None
    max_tokens: _Int | None = Field(default=None, ge=1)
    max_completion_tokens: _Int | None = Field(default=None, ge=1)
    temperature: _Float | None = Field(default=None, ge=0, le=2)
    top_p: _Float | None = Field(default=None, ge=0, le=1)
    n: _Int | None = Field(default=None, ge=1, le=128)
    stop: str | list[str] | None = Field(default=None)
    seed: _Int | None = None
    presence_penalty: _Float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: _Float | None = Field(default=None, ge=-2, le=2)
    logprobs: StrictBool | None = None
    top_logprobs: _Int | None = Field(default=None, ge=0, le=20)
    logit_bias: dict[str, _Float] | None = None
    user: str | None = None
    response_format: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: StrictBool | None = None

    @field_validator("stop")
    @classmethod
    def _at_most_four_stops(cls, value: str | list[str] | None) -> str | list[str] | None:
        if isinstance(value, list) and len(value) > 4:
            raise ValueError("at most 4 stop sequences")
        return value


class CompletionRequest(_Open):
    """An OpenAI ``/v1/completions`` (legacy text completion) request body."""

    model: str = Field(min_length=1, max_length=255)
    prompt: str | list[Any]
    stream: _Stream = False
    max_tokens: _Int | None = Field(default=None, ge=1)
    temperature: _Float | None = Field(default=None, ge=0, le=2)
    top_p: _Float | None = Field(default=None, ge=0, le=1)


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


class QueueStatus(_Open):
    """A status message's body (``x-hutch-kind: status``): where a queued request stands.
    Never an answer; see the wire contract's "Queue status"."""

    object: Literal["hutch.queue_status"] = "hutch.queue_status"
    #: The pool it waits for.
    pool: str = ""
    #: Requests that will start before it (an estimate: see docs/concepts/capacity.md).
    position: int = 0
    #: Their tokens (prompt + completion); None until the pool served one with usage.
    tokens_ahead: int | None = None
    #: Seconds from ``estimated_at_ms`` to its estimated start; None while the pool's
    #: service rate is unknown (nothing completed recently).
    estimated_start_s: float | None = None
    #: The estimated start and when it was estimated, epoch milliseconds (the worker's
    #: clock).
    estimated_start_at_ms: int | None = None
    estimated_at_ms: int = 0
