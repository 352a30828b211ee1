"""The OpenAI chat-completions shapes Hutch reads and returns.

Only what Hutch itself relies on is typed; every other field is kept as sent
(``extra="allow"``), so a backend sees the request the application wrote and the
application sees the completion the backend wrote.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "ChatCompletion",
    "ChatMessage",
    "ChatRequest",
    "Choice",
    "ErrorDetail",
    "ErrorReply",
    "Usage",
]


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


class ChatMessage(_Open):
    role: str = Field(min_length=1)
    content: str | list[Any] | None = None


class ChatRequest(_Open):
    """An OpenAI ``/v1/chat/completions`` request body."""

    model: str = Field(min_length=1, max_length=255)
    messages: list[ChatMessage] = Field(min_length=1)
    stream: bool = False
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)


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


class ErrorDetail(_Open):
    type: str
    code: str
    message: str


class ErrorReply(BaseModel):
    """The body of every error reply: ``{"error": {"type", "code", "message"}}``."""

    error: ErrorDetail
