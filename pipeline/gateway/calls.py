"""An HTTP request checked and turned into a call on the queue.

Everything a client can get wrong is refused here, before anything is published, with
the status an OpenAI client expects: a missing or wrong key (401), a body that is not
JSON (415 for another content type, 400 for bad JSON: read by the worker's own parser, so
UTF-16, a byte-order mark or nesting past its limit never reach the queue), too large
(413, judged by ``Content-Length`` before reading, or while reading a chunked body), or
too slow to arrive (408), a model no pool serves (404), a bad priority, deadline or
status header (400).

Priority: the ``x-hutch-priority`` header, else a ``priority`` field in the body (as vLLM
accepts; in Hutch's scale, 0 lowest), else the client's default; clamped to the client's
ceiling. The body's ``priority`` field is removed before publishing (a backend with
``send_priority`` gets vLLM's own, mapped, from the worker). Deadline: ``x-hutch-timeout``
(seconds), else the client's default, else the gateway's. Queue status:
``x-hutch-status-after`` (seconds), for streams only: a stream still queued that long (by
its estimate) gets an SSE comment ``: queued ...`` before its first chunk.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from pydantic_core import from_json

from pipeline import protocol as p
from pipeline.errors import GatewayRefusal
from pipeline.gateway.auth import Client, KeyRing
from pipeline.gateway.settings import GatewaySettings
from pipeline.observe.log import get_logger
from pipeline.scheduling.tenants import TenantBook

__all__ = ["H_PRIORITY", "H_STATUS_AFTER", "H_TIMEOUT", "Call", "CallReader", "refusal"]

log = get_logger("hutch.gateway")

#: Request headers a caller may set.
H_PRIORITY = "x-hutch-priority"
H_TIMEOUT = "x-hutch-timeout"
H_STATUS_AFTER = "x-hutch-status-after"


def refusal(status: int, message: str, *, code: str = "invalid_request",
            type: str = "invalid_request_error") -> GatewayRefusal:
    """The error the gateway answers itself with HTTP ``status``."""
    return GatewayRefusal(message, code=code, type=type, status=status)


@dataclass(frozen=True, slots=True)
class Call:
    """One checked request, ready to publish."""

    endpoint: p.Endpoint
    model: str
    body: bytes
    stream: bool
    priority: int
    timeout_s: float
    client: Client
    #: ``x-hutch-status-after`` of a stream (None: not asked, or not a stream).
    status_after_s: float | None = None


def _json(raw: bytes) -> Any:
    """The body parsed by the worker's own JSON parser (pydantic's), so what the worker
    would park as ``invalid_json`` is refused here, before publishing: not UTF-8 (UTF-16,
    a byte-order mark), lone surrogates, nesting deeper than its limit (Python's ``json``
    would read UTF-16 and raise ``RecursionError`` on deep nesting)."""
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise refusal(400, f"request body is not UTF-8 JSON (byte {exc.start} is not "
                      "UTF-8; UTF-16 and other encodings are refused)") from None
    try:
        return from_json(raw)
    except ValueError as exc:
        why = str(exc)
        if "recursion limit" in why:
            raise refusal(400, f"request body is nested too deeply ({why})") from None
        if raw.startswith(b"\xef\xbb\xbf"):
            why = "UTF-8 JSON must not start with a byte-order mark"
        raise refusal(400, f"request body is not valid JSON: {why}") from None


def _number(text: str, name: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise refusal(400, f"header {name} must be a number, got {text[:40]!r}") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise refusal(400, f"header {name} must be a finite number")
    return value


def _asked_priority(request: web.Request, body: dict[str, Any]) -> int | None:
    header = request.headers.get(H_PRIORITY)
    field = body.pop("priority", None)
    if header is not None:
        value = _number(header, H_PRIORITY)
        if not value.is_integer():
            raise refusal(400, f"header {H_PRIORITY} must be an integer")
        return int(value)
    if field is None:
        return None
    if isinstance(field, bool) or not isinstance(field, int):
        raise refusal(400, "'priority' must be an integer")
    return field


class CallReader:
    """Reads calls for one gateway: its keys, limits and models."""

    def __init__(self, settings: GatewaySettings, keys: KeyRing, *, max_body_bytes: int,
                 models: Collection[str],
                 auth_failed: Callable[[str], None] | None = None,
                 tenants: TenantBook | None = None) -> None:
        self._settings = settings
        self._keys = keys
        #: Tenants' priority ceilings apply here too, as at the worker.
        self._tenants = tenants or TenantBook({})
        self._max_body = max_body_bytes
        self._models = frozenset(models)
        self._auth_failed = auth_failed

    def client(self, request: web.Request) -> Client:
        """The caller, or 401 (counted by reason; logged at debug with the peer, never
        with the header)."""
        authorization = request.headers.get("Authorization")
        client = self._keys.client(authorization)
        if client is None:
            reason = self._keys.failure(authorization)
            if self._auth_failed is not None:
                self._auth_failed(reason)
            log.debug("gateway.auth_failed", reason=reason, peer=request.remote,
                      path=request.path)
            raise refusal(401, "missing or invalid API key: send `Authorization: Bearer "
                          "<key>`", code="invalid_api_key")
        return client

    async def _body(self, request: web.Request) -> tuple[bytes, dict[str, Any]]:
        if request.content_type != "application/json":
            raise refusal(415, f"Content-Type must be application/json, got "
                          f"{request.content_type!r}", code="unsupported_media_type")
        if request.content_length is not None and request.content_length > self._max_body:
            raise refusal(413, f"request body of {request.content_length} bytes is over the "
                          f"limit of {self._max_body}", code="request_too_large")
        try:
            async with asyncio.timeout(self._settings.body_timeout_s):
                raw = await request.read()
        except TimeoutError:
            raise refusal(408, f"the request body did not arrive within "
                          f"{self._settings.body_timeout_s:g}s", code="request_timeout"
                          ) from None
        except web.HTTPRequestEntityTooLarge:
            raise refusal(413, f"request body is over the limit of {self._max_body} bytes",
                          code="request_too_large") from None
        body = _json(raw)
        if not isinstance(body, dict):
            raise refusal(400, "request body must be a JSON object")
        return raw, body

    def _priority(self, client: Client, asked: int | None) -> int:
        """The key's priority for the ask, lowered to its tenant's ceiling, if any."""
        tenant = self._tenants.tenant_of(client.identity)
        return self._tenants.served_priority(tenant, client.priority(asked))

    def _timeout(self, request: web.Request, client: Client) -> float:
        header = request.headers.get(H_TIMEOUT)
        if header is None:
            return client.timeout_s or self._settings.default_timeout_s
        value = _number(header, H_TIMEOUT)
        if not 0 < value <= self._settings.max_timeout_s:
            raise refusal(400, f"header {H_TIMEOUT} must be within 0 (excluded) .. "
                          f"{self._settings.max_timeout_s:g} seconds")
        return value

    def _status_after(self, request: web.Request) -> float | None:
        header = request.headers.get(H_STATUS_AFTER)
        if header is None:
            return None
        value = _number(header, H_STATUS_AFTER)
        if not 0 <= value <= self._settings.max_timeout_s:
            raise refusal(400, f"header {H_STATUS_AFTER} must be within 0 .. "
                          f"{self._settings.max_timeout_s:g} seconds")
        return value

    def _model(self, body: dict[str, Any]) -> str:
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise refusal(400, "'model' is required and must be a string")
        if self._models and model not in self._models:
            raise refusal(404, f"the model {model!r} does not exist",
                          code="model_not_found")
        return model

    async def read(self, request: web.Request, endpoint: p.Endpoint) -> Call:
        """Check ``request`` for ``endpoint`` and make its call (or raise the refusal)."""
        client = self.client(request)
        raw, body = await self._body(request)
        stream = self._stream(body, endpoint)
        had_priority = "priority" in body
        asked = _asked_priority(request, body)
        model = self._model(body)
        if had_priority:  # published without it: the body as the backend should see it
            raw = json.dumps(body, separators=(",", ":")).encode()
        return Call(endpoint, model, raw, stream, self._priority(client, asked),
                    self._timeout(request, client), client,
                    self._status_after(request) if stream else None)

    @staticmethod
    def _stream(body: dict[str, Any], endpoint: p.Endpoint) -> bool:
        stream = body.get("stream", False)
        if stream is not None and not isinstance(stream, bool):
            raise refusal(400, "'stream' must be a boolean")
        if stream and endpoint is not p.Endpoint.CHAT:
            raise refusal(400, f"streaming is served for chat completions only, not "
                          f"{endpoint.value}")
        return bool(stream)
