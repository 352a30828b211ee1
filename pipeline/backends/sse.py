"""Server-sent events, as OpenAI-compatible servers stream a chat completion.

A streamed answer is a sequence of events, each one or more ``data:`` lines ended by a
blank line; the data of each event is a ``chat.completion.chunk`` JSON object, and the
last one is ``[DONE]``. Comments (lines starting with ``:``, used as keep-alives) and
other fields (``event:``, ``id:``, ``retry:``) are ignored. A data payload that is not a
JSON object is a malformed stream: :class:`~pipeline.errors.BackendProtocolError`.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

from pipeline.errors import BackendProtocolError

__all__ = ["DONE", "SSEReader"]

#: The data of the event that ends an OpenAI stream.
DONE = "[DONE]"


def _decode(data: str, backend: str) -> dict[str, Any]:
    try:
        event = json.loads(data)
    except ValueError:
        raise BackendProtocolError(
            f"backend {backend} sent a malformed stream event: {data[:200]!r}") from None
    if not isinstance(event, dict):
        raise BackendProtocolError(
            f"backend {backend} sent a stream event that is not an object: {data[:200]!r}")
    return event


class SSEReader:
    """Reads a stream's events; :attr:`done` says whether ``[DONE]`` ended it (a body that
    simply stops before it, with no ``finish_reason`` either, was cut short)."""

    def __init__(self, lines: AsyncIterator[str], backend: str) -> None:
        self._lines = lines
        self._backend = backend
        self.done = False

    async def events(self) -> AsyncIterator[tuple[str, dict[str, Any]]]:
        """Each event until ``[DONE]`` or the body's end: its data as sent (JSON text, to
        forward without encoding it again) and as an object."""
        data: list[str] = []
        async for line in self._lines:
            if line.startswith("data:"):
                data.append(line[6:] if line.startswith("data: ") else line[5:])
                continue
            if line or not data:
                continue  # a comment, another field, or a blank line between events
            payload, data = "\n".join(data), []
            if payload.strip() == DONE:
                self.done = True
                return
            yield payload, _decode(payload, self._backend)
        if data:  # the body ended without the blank line after its last event
            payload = "\n".join(data)
            if payload.strip() == DONE:
                self.done = True
            else:
                yield payload, _decode(payload, self._backend)
