"""What a request message is made of: the client id, a chat body, the request's headers,
and the message itself."""

from __future__ import annotations

import os
import socket
import time
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

import aio_pika

from pipeline import protocol as p
from pipeline.models import ChatMessage

__all__ = ["chat_body", "default_client_id", "request_headers", "request_message"]


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


def request_headers(endpoint: p.Endpoint | None, extra: Mapping[str, Any] | None,
                    status_after: float | None = None) -> dict[str, Any]:
    """A request's own AMQP headers: its endpoint (chat is the default), ``extra``, and
    ``status_after`` (seconds): ask for a status message if it waits longer."""
    headers = dict(extra or {})
    if endpoint is not None and endpoint is not p.Endpoint.CHAT:
        headers[p.H_ENDPOINT] = endpoint.value
    if status_after is not None:
        if not 0 <= status_after <= 30 * 24 * 3600:
            raise ValueError(f"status_after must be 0 .. 30 days, got {status_after}")
        headers[p.H_STATUS_AFTER_MS] = int(status_after * 1000)
    return headers


def request_message(payload: bytes, correlation_id: str, *,
                    reply_to: str, user: str, priority: int, timeout_s: float,
                    extra: Mapping[str, Any] | None = None) -> aio_pika.Message:
    """A request as HutchClient publishes it: persistent, its deadline both relative (the
    worker's clock) and absolute, its send time, and ``extra`` headers."""
    if not 0 <= priority <= 255:
        raise ValueError(f"priority must be in 0..255, got {priority}")
    sent_ms = p.now_ms()
    headers: dict[str, Any] = {p.H_SENT_AT: sent_ms,  # the timeout wins over the deadline
                               p.H_TIMEOUT_MS: max(1, int(timeout_s * 1000)),
                               p.H_DEADLINE: sent_ms + int(timeout_s * 1000)}
    if extra:
        headers.update(extra)
    return aio_pika.Message(
        payload,
        content_type="application/json",
        correlation_id=correlation_id,
        reply_to=reply_to,
        priority=priority,
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        expiration=timeout_s,
        timestamp=time.time(),
        user_id=user,
        headers=headers,
    )
