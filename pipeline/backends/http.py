"""Calling one OpenAI-compatible backend over HTTP.

A :class:`Backend` sends a chat request and either returns the completion or raises one
of the typed worker-side errors of :mod:`pipeline.errors`, classified once, here, from
httpx's public exception types and the HTTP status (never from a message's text):

* no connection (refused, DNS, TLS): ``BackendUnreachableError``; not in time:
  ``BackendConnectTimeoutError``;
* the connection closed or reset mid-request: ``BackendDisconnectedError``;
* no byte for the read timeout: ``BackendTimeoutError``;
* a malformed response: ``BackendProtocolError``; HTTP 200 without a completion:
  ``InvalidCompletionError``;
* 408 and 5xx: ``RetryableStatusError``; 429: ``ThrottledError``; 404 that names no
  model (a path the server lacks: a base url without ``/v1``): ``BackendNotFoundError``,
  the backend's fault; any
  other status: ``TerminalStatusError``.

:meth:`Backend.chat` reads the whole answer; :meth:`Backend.stream` opens it for reading
as it arrives (server-sent events) and closes the connection when left early. Both share
one request builder and one error mapping. The transport is Hutch's own over aiohttp
(:mod:`pipeline.backends.transport`): httpx's default transport costs about 8x in
throughput on this path; tests swap in ``httpx.MockTransport`` through the same seam.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import httpx
from pydantic import ValidationError

from pipeline.backends.hints import retry_after_s
from pipeline.backends.saturation import SaturationReader
from pipeline.backends.transport import AiohttpTransport
from pipeline.errors import (
    BackendCallError,
    BackendConnectTimeoutError,
    BackendDisconnectedError,
    BackendNotFoundError,
    BackendProtocolError,
    BackendTimeoutError,
    BackendUnreachableError,
    InvalidCompletionError,
    RetryableError,
    RetryableStatusError,
    TerminalStatusError,
    ThrottledError,
)
from pipeline.models import ChatCompletion, EmbeddingList, TextCompletion, Usage
from pipeline.protocol import Endpoint
from pipeline.settings import BackendSettings

__all__ = ["Backend", "BackendResult", "BackendStream"]

_T = TypeVar("_T")
#: httpx's errors of a connection that broke after the request went out.
_DROPPED = (httpx.ReadError, httpx.WriteError, httpx.CloseError)
#: ... and of a response that is not valid HTTP (or whose encoding is broken).
_MALFORMED = (httpx.ProtocolError, httpx.DecodingError)


#: What a 200 answer of each endpoint must parse as, and what it is called in errors.
_ANSWERS: dict[Endpoint, tuple[type[ChatCompletion | TextCompletion | EmbeddingList], str]] = {
    Endpoint.CHAT: (ChatCompletion, "completion"),
    Endpoint.COMPLETIONS: (TextCompletion, "text completion"),
    Endpoint.EMBEDDINGS: (EmbeddingList, "embeddings list"),
}


@dataclass(frozen=True)
class BackendResult:
    """A successful call: the answer as the backend sent it, and how long it took."""

    body: bytes
    completion: ChatCompletion | TextCompletion | EmbeddingList
    elapsed_s: float

    @property
    def usage(self) -> Usage | None:
        return self.completion.usage


#: The fields of a backend's OpenAI-shaped error kept in Hutch's reply.
_DETAIL_FIELDS = ("type", "code", "param")


def _error_of(response: httpx.Response) -> tuple[str, dict[str, Any]]:
    """The backend's own error message and fields if it sent an OpenAI error (LiteLLM,
    llama.cpp, vLLM and OpenAI do), else the raw text and no fields."""
    try:
        error = response.json()["error"]
        message = error["message"]
        if isinstance(message, str):
            detail = {key: error[key] for key in _DETAIL_FIELDS
                      if isinstance(error.get(key), str | int)}
            return message[:500], detail
    except (ValueError, KeyError, TypeError):
        pass
    return response.text[:500] or response.reason_phrase, {}


def _lacks_the_model(response: httpx.Response) -> bool:
    """Whether a 404 is about the request: the server's error says which model it lacks
    (OpenAI's ``model_not_found``, vLLM's "The model `x` does not exist", Ollama's "model
    'x' not found"). Any other 404 -- a bare one, FastAPI's ``{"detail": "Not Found"}``,
    llama.cpp's "File Not Found", OpenAI's "Invalid URL" -- is a path the server lacks: a
    base url without ``/v1``, the backend's configuration, not the client's request."""
    return "model" in response.text.lower()


#: What a 404 about a path means, for the operator.
_URL_HINT = ("check the backend url: the server has no such path (an OpenAI-compatible "
             "base url usually ends in /v1)")


class BackendStream:
    """A 200 response being read as it arrives, inside :meth:`Backend.stream`.

    Reading raises the same typed errors as :meth:`Backend.chat` (a connection dropped
    mid-body is ``BackendDisconnectedError``, a stall ``BackendTimeoutError``).
    """

    def __init__(self, response: httpx.Response,
                 failure: Callable[[httpx.HTTPError], BackendCallError]) -> None:
        self.response = response
        self._failure = failure

    @property
    def headers(self) -> httpx.Headers:
        return self.response.headers

    def aiter_bytes(self) -> AsyncIterator[bytes]:
        """The body's bytes, as they arrive."""
        return self._typed(self.response.aiter_bytes())

    def aiter_lines(self) -> AsyncIterator[str]:
        """The body's lines (without line endings), as they arrive: SSE's ``data:`` lines."""
        return self._typed(self.response.aiter_lines())

    async def _typed(self, items: AsyncIterator[_T]) -> AsyncIterator[_T]:
        """``items``, with httpx's failures raised as Hutch's typed errors."""
        try:
            async for item in items:
                yield item
        except httpx.HTTPError as exc:
            raise self._failure(exc) from None


class Backend:
    """One backend endpoint with its own connection pool."""

    def __init__(self, settings: BackendSettings,
                 transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.settings = settings
        self.name = settings.name
        headers = {"content-type": "application/json"}
        api_key = settings.api_key()
        if api_key:
            headers["authorization"] = f"Bearer {api_key}"
        self._api_key = api_key
        limits = httpx.Limits(max_connections=settings.max_concurrency,
                              max_keepalive_connections=settings.max_concurrency)
        self._transport = transport or AiohttpTransport(limits=limits)
        self._http = httpx.AsyncClient(
            base_url=settings.url,
            headers=headers,
            transport=self._transport,
            timeout=settings.timeout_s,
        )
        # The hot path builds its request from these and hands it straight to the transport:
        # the request is the one ``AsyncClient.post`` would build (same URL, headers and
        # timeout), without the per-call URL merging, redirect, auth and cookie machinery
        # that cost more than the aiohttp call itself (see tests/test_fastpath.py).
        self._urls = {endpoint: self._http.build_request("POST", endpoint.path).url
                      for endpoint in Endpoint}
        self._headers = self._http.headers.raw
        self._default_timeout = httpx.Timeout(settings.timeout_s).as_dict()
        #: Whether a backend ever set a cookie (testing the jar itself costs a lock).
        self._cookies = False
        #: Reads the backend's saturation metrics, if it has a ``metrics_url``: a client of
        #: its own, without the API key (a metrics URL may be another host).
        self.metrics: SaturationReader | None = None
        if settings.metrics_url is not None:
            self.metrics = SaturationReader(settings.name, settings.metrics_url,
                                            httpx.AsyncClient(transport=transport))

    async def aclose(self) -> None:
        await self._http.aclose()
        if self.metrics is not None:
            await self.metrics.aclose()

    def _redact(self, message: str) -> str:
        """Error texts may echo what was sent (proxies repeat the key): never the key."""
        return message.replace(self._api_key, "***") if self._api_key else message

    async def probe(self, timeout_s: float = 5.0) -> httpx.Response:
        """``GET <url>/models``, read: the cheap request every OpenAI-compatible server
        answers, to find a wrong base url at start rather than on the first request."""
        response = await self._http.get("/models",
                                        timeout=min(timeout_s, self.settings.timeout_s))
        await response.aread()
        return response

    async def chat(self, body: bytes, *, timeout_s: float | None = None,
                   request_id: str | None = None) -> BackendResult:
        """POST ``/chat/completions`` and read the completion; ``timeout_s`` may shorten the
        configured timeout."""
        return await self.call(Endpoint.CHAT, body, timeout_s=timeout_s,
                               request_id=request_id)

    async def call(self, endpoint: Endpoint, body: bytes, *, timeout_s: float | None = None,
                   request_id: str | None = None) -> BackendResult:
        """POST to ``endpoint`` and read the whole answer, checked for its shape."""
        started = time.monotonic()
        response, timeout = await self._open(body, timeout_s, request_id, endpoint)
        content = await self._read(response, timeout)
        elapsed = time.monotonic() - started
        model, what = _ANSWERS[endpoint]
        try:
            answer = model.model_validate_json(content)
        except ValidationError as exc:
            raise InvalidCompletionError(
                f"backend {self.name} returned an invalid {what}: "
                f"{exc.errors()[0]['msg']}", status=200) from None
        return BackendResult(content, answer, elapsed)

    @asynccontextmanager
    async def stream(self, body: bytes, *, timeout_s: float | None = None,
                     request_id: str | None = None) -> AsyncIterator[BackendStream]:
        """POST ``/chat/completions`` and read the answer as it arrives::

            async with backend.stream(body, timeout_s=30) as answer:
                async for line in answer.aiter_lines():
                    ...

        A status other than 200 raises on entry, before the body is read. ``timeout_s``
        bounds the wait for each byte (the gap between chunks), not the whole stream.
        Leaving the block before the end closes the connection: the server sees the
        client go away and can stop generating.
        """
        response, timeout = await self._open(body, timeout_s, request_id)
        try:
            yield BackendStream(response, lambda exc: self._failure(exc, timeout))
        finally:
            await response.aclose()

    async def _open(self, body: bytes, timeout_s: float | None, request_id: str | None,
                    endpoint: Endpoint = Endpoint.CHAT) -> tuple[httpx.Response, float]:
        """Send the request; return the 200 response, unread, and the call's timeout.
        Any other status is read and raised as its typed error."""
        timeout = self.settings.timeout_s if timeout_s is None else min(
            timeout_s, self.settings.timeout_s)
        request = self._request(body, timeout, request_id, endpoint)
        try:
            response = await self._transport.handle_async_request(request)
        except httpx.HTTPError as exc:
            raise self._failure(exc, timeout) from None
        response.request = request  # as the client does (not every transport sets it)
        if "set-cookie" in response.headers:
            self._http.cookies.extract_cookies(response)
            self._cookies = True
        if response.status_code != 200:
            await self._read(response, timeout)
            raise self._status_error(response)
        return response, timeout

    def _request(self, body: bytes, timeout: float, request_id: str | None,
                 endpoint: Endpoint = Endpoint.CHAT) -> httpx.Request:
        """The request ``AsyncClient.post`` would build, built directly (the hot path)."""
        headers = self._headers
        if request_id:
            # ascii, as httpx encodes a str header (a non-ascii id fails the same way)
            headers = [*headers, (b"x-request-id", request_id.encode("ascii"))]
        # Cookies, as the client would keep them: only if a backend set some (a sticky LB).
        cookies = self._http.cookies if self._cookies else None
        extensions: dict[str, Any] = {"timeout": self._default_timeout
                                      if timeout == self.settings.timeout_s
                                      else httpx.Timeout(timeout).as_dict()}
        return httpx.Request("POST", self._urls[endpoint], headers=headers, content=body,
                             cookies=cookies, extensions=extensions)

    async def _read(self, response: httpx.Response, timeout: float) -> bytes:
        """The whole body, then the response closed; failures typed."""
        try:
            return await response.aread()
        except httpx.HTTPError as exc:
            raise self._failure(exc, timeout) from None
        finally:
            await response.aclose()

    def _failure(self, exc: httpx.HTTPError, timeout: float) -> RetryableError:
        """The typed error of a failed exchange, by httpx's exception type alone."""
        if isinstance(exc, httpx.ConnectTimeout | httpx.PoolTimeout):
            return BackendConnectTimeoutError(
                f"backend {self.name} timed out connecting after {timeout:.1f}s")
        if isinstance(exc, httpx.TimeoutException):
            return BackendTimeoutError(f"backend {self.name} timed out after {timeout:.1f}s")
        detail = self._redact(f"{type(exc).__name__}: {exc}")[:500]
        if isinstance(exc, _DROPPED):
            return BackendDisconnectedError(
                f"backend {self.name} dropped the connection: {detail}")
        if isinstance(exc, _MALFORMED):
            return BackendProtocolError(
                f"backend {self.name} sent a malformed response: {detail}")
        return BackendUnreachableError(f"backend {self.name} unreachable: {detail}")

    def _status_error(self, response: httpx.Response) -> BackendCallError:
        """The typed error of a read response whose status is not 200."""
        status = response.status_code
        text, detail = _error_of(response)
        message = self._redact(f"backend {self.name} answered HTTP {status}: {text}")
        if status == 429:
            return ThrottledError(
                message, retry_after_s=retry_after_s(response.headers))
        if status == 408 or status >= 500:
            return RetryableStatusError(message, status=status, detail=detail)
        if status == 404 and not _lacks_the_model(response):
            return BackendNotFoundError(f"{message} ({_URL_HINT})", status=status)
        return TerminalStatusError(message, status=status, detail=detail)
