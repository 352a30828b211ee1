"""A mock OpenAI-compatible LLM backend with a hard concurrency cap and fault injection.

Hutch's demo, tests and benchmarks need a backend that behaves like a real one where it
matters to a request queue (fixed capacity, fixed latency, OpenAI request/response shapes)
while being deterministic and observable: ``GET /stats`` shows how many requests were ever
open at once, so a benchmark can prove that callers never exceeded a backend cap.

Failure tests need a backend that fails the way real ones do. The mock injects, on
request (none by default; see :class:`MockConfig`):

- **errors**: ``fail_rate`` (a random fraction) or ``fail_first`` (the first N requests,
  deterministic) answered with ``fail_status`` (500) and an OpenAI error body, after
  holding a slot for the latency like a real busy server;
- **throttling**: ``throttle_rate`` answered ``429`` with ``Retry-After: retry_after_s``
  at once, without taking a slot (a real server throttles at the door);
- **hangs**: ``hang_rate`` requests hold their slot for ``hang_s`` (an hour by default)
  before answering, to provoke client timeouts;
- **connection refused**: stop the mock; ``start()`` again rebinds the same port;
- **stream faults** (streamed replies only, after ``fault_after_tokens`` tokens):
  ``cut_rate`` closes the connection mid-stream, ``malformed_rate`` sends a ``data:`` line
  that is not JSON, ``stall_rate`` stops for ``hang_s`` between two chunks.

``"stream": true`` is answered with server-sent events as OpenAI-compatible servers send
them (a role chunk, one chunk per token, a finishing chunk, the usage chunk if
``stream_options.include_usage``, ``[DONE]``), after a time to first token (``ttft_ms``)
and an inter-token latency (``itl_ms``), jittered (``jitter``); the slot is held until the
stream ends. Streamed or not, a reply is the same words, so the two can be compared. A
client that goes away (waiting, in service or mid-stream) frees its slot and is counted in
``/stats`` as ``aborted``, with its ``X-Request-Id`` in ``aborted_ids``: how a test proves
a cancel reached the backend. The id lists keep the last ``ids_kept`` (1,000) ids.

Faults can be replaced at runtime with ``POST /faults`` (``{}`` clears them, a test can
"fix" a backend mid-run), read with ``GET /faults``, or set in-process with
:meth:`MockBackend.set_faults`. ``seed`` makes the random choices repeatable.

**Realistic mode** (``MockConfig(engine=EngineConfig(...))``, ``--realistic``): chat
requests share a KV budget in tokens, each token takes longer as the batch grows, requests
beyond the budget (or ``max_running``) wait FIFO inside the mock and, with ``preempt``, the
newest running request is paused back when the budget runs out; ``GET /metrics`` exports
all of it under vLLM's metric names, and ``POST /admin/capacity`` changes the capacity at
run time (:mod:`.engine_config`, :mod:`.engine`, :mod:`.engine_metrics`).

One concept per module, in the order a request meets them: :mod:`.config` (what the
mock is told), :mod:`.chat` (the OpenAI shapes), :mod:`.faults` (which requests fail),
:mod:`.stream` (a streamed reply, paced), :mod:`.stats` (what it counts),
:mod:`.server` (the HTTP server), :mod:`.options` and
:mod:`.cli` (the process). The server and the process are imported on first use, so a
CLI that only registers :func:`add_arguments` does not import aiohttp.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from pipeline.testing.mock.config import FAULT_FIELDS, MockConfig
from pipeline.testing.mock.engine_config import CAPACITY_FIELDS, EngineConfig
from pipeline.testing.mock.options import add_arguments

if TYPE_CHECKING:
    from pipeline.testing.mock.cli import run_from_args, serve
    from pipeline.testing.mock.server import MockBackend

__all__ = [
    "CAPACITY_FIELDS",
    "FAULT_FIELDS",
    "EngineConfig",
    "MockBackend",
    "MockConfig",
    "add_arguments",
    "run_from_args",
    "serve",
]

_LAZY = {
    "MockBackend": "pipeline.testing.mock.server",
    "run_from_args": "pipeline.testing.mock.cli",
    "serve": "pipeline.testing.mock.cli",
}


def __getattr__(name: str) -> Any:
    """Import the server and the process runner on first use (they need aiohttp)."""
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
