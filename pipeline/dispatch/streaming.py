"""One streaming attempt: read the backend's server-sent events, forward them as chunks.

The backend slot is held for the whole stream (the delivery stays unacked until the
settler has published the final message). Timing: the request's deadline (and the
backend's ``timeout_s``) bounds the start, queue wait plus time to the first chunk; after
the first chunk, ``stream_idle_timeout_s`` bounds the gap between two chunks. A failure
before the first chunk is retried like any other; after it, the client has part of an
answer, so the decisions (:func:`pipeline.dispatch.decide.after_failure`) end the stream
with ``stream_interrupted``.
"""

from __future__ import annotations

import asyncio
import json
import time

from pipeline.backends.http import Backend
from pipeline.backends.sse import SSEReader
from pipeline.delivery import Delivery
from pipeline.dispatch.assemble import Assembler
from pipeline.errors import BackendDisconnectedError, BackendTimeoutError
from pipeline.models import Usage
from pipeline.observe.hooks import DeliveryHook
from pipeline.outcome import Completed
from pipeline.settle.stream import StreamSink

__all__ = ["stream_attempt"]


async def _relay(reader: SSEReader, assembler: Assembler, sink: StreamSink,
                 watchdog: asyncio.Timeout, idle_timeout_s: float, delivery: Delivery,
                 hooks: DeliveryHook) -> None:
    """Forward every event to the sink; each one moves the watchdog to the idle bound.

    The bound is the backend's silence, not this worker's publishing: the watchdog is
    off while a chunk goes out. A confirm slow on a busy broker was blamed on the backend
    ("went silent"), and the publish it cut had reached the client without being counted
    (``content_chars_sent`` 0 for a reader shown text)."""
    loop = asyncio.get_running_loop()
    first = True
    async for raw, chunk in reader.events():
        watchdog.reschedule(None)
        await sink.add(raw, content=assembler.add(chunk))
        watchdog.reschedule(loop.time() + idle_timeout_s)
        if first:
            first = False
            hooks.first_chunk(delivery)
        if delivery.stream is not None:
            delivery.stream.content_chars = assembler.content_chars


async def stream_attempt(delivery: Delivery, backend: Backend, body: bytes, sink: StreamSink,
                         *, idle_timeout_s: float, hooks: DeliveryHook) -> Completed:
    """Stream one attempt to the client; the assembled completion for the final message.
    Raises the backend's typed errors (a stream cut short is ``disconnected``)."""
    remaining = delivery.remaining_s()
    start_s = backend.settings.timeout_s if remaining is None else min(
        remaining, backend.settings.timeout_s)
    started = time.monotonic()
    assembler = Assembler()
    try:
        async with asyncio.timeout(start_s) as watchdog:
            async with backend.stream(body, request_id=delivery.correlation_id) as answer:
                reader = SSEReader(answer.aiter_lines(), backend.name)
                await _relay(reader, assembler, sink, watchdog, idle_timeout_s, delivery,
                             hooks)
    except TimeoutError:
        silent = (f"went silent for {idle_timeout_s:.1f}s mid-stream" if assembler.started
                  else f"sent no chunk within {start_s:.1f}s")
        raise BackendTimeoutError(f"backend {backend.name} {silent}") from None
    if not reader.done and not assembler.finished:
        raise BackendDisconnectedError(
            f"backend {backend.name} ended the stream before it was complete")
    await sink.flush()
    completion = assembler.completion()
    usage = completion.get("usage")
    return Completed(json.dumps(completion, separators=(",", ":")).encode(),
                     Usage.model_validate(usage) if isinstance(usage, dict) else None,
                     time.monotonic() - started)
