"""What a request message is made of: the client id, a chat body, the request's headers."""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

from pipeline import protocol as p
from pipeline.models import ChatMessage

__all__ = ["chat_body", "default_client_id", "request_headers"]


def default_client_id(user: str) -> str:
    """``<user>.<host>-<pid>-<random>``: under a per-client user (see ``hutch client
    add``) the reply queue must be named after the user, and this stays unique."""
    host = socket.gethostname().replace(".", "-")
    return f"{user}.{host}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def chat_body(model: str, messages: Sequence[Mapping[str, Any] | ChatMessage],
              params: Mapping[str, Any]) -> dict[str, Any]:
    """An OpenAI chat-completions body; ``params`` go to the backend as written."""
    return {
        "model": model,
        "messages": [m.model_dump(exclude_none=True) if isinstance(m, ChatMessage)
                     else dict(m) for m in messages],
        **params,
    }


def request_headers(endpoint: p.Endpoint | None, extra: Mapping[str, Any] | None
                    ) -> dict[str, Any]:
    """A request's own AMQP headers: its endpoint (chat is the default) and ``extra``."""
    headers = dict(extra or {})
    if endpoint is not None and endpoint is not p.Endpoint.CHAT:
        headers[p.H_ENDPOINT] = endpoint.value
    return headers
