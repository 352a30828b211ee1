"""Hutch's httpx transport over aiohttp: httpx's API at aiohttp's speed, failures typed.

httpx's own transport costs about 8x in throughput on the backend call (see BENCHMARKS.md),
so Hutch keeps httpx's request/response API and sends through aiohttp. This module maps
aiohttp's *public* exceptions onto httpx's public ones, one to one, so that
:mod:`pipeline.backends.http` classifies a failure by its type alone:

======================================  =========================  =========================
aiohttp                                 httpx                      meaning
======================================  =========================  =========================
ClientConnectorError (+ DNS, TLS)       ConnectError               refused or unreachable
ConnectionTimeoutError                  ConnectTimeout             no connection in time
SocketTimeoutError, ServerTimeoutError  ReadTimeout                no byte for ``read`` s
ClientResponseError, HttpProcessingErr  RemoteProtocolError        malformed status/headers
ServerDisconnectedError, ClientOSError  ReadError                  closed or reset mid-request
ClientPayloadError, other connection
======================================  =========================  =========================

The body comes back as a stream that reads from aiohttp as bytes arrive; closing it before
the end closes the connection, so the server sees the client go away (vLLM then aborts the
generation and frees its cache).
"""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator

import aiohttp
import httpx
import yarl
from aiohttp.http import HttpProcessingError

__all__ = ["AiohttpTransport"]

#: aiohttp's exception -> httpx's, most specific first (the first match wins).
_ERRORS: tuple[tuple[type[Exception], type[httpx.TransportError]], ...] = (
    (aiohttp.ClientConnectorError, httpx.ConnectError),
    (aiohttp.ServerFingerprintMismatch, httpx.ConnectError),
    (aiohttp.ConnectionTimeoutError, httpx.ConnectTimeout),
    (aiohttp.ServerTimeoutError, httpx.ReadTimeout),
    (aiohttp.ClientResponseError, httpx.RemoteProtocolError),
    (HttpProcessingError, httpx.RemoteProtocolError),
    (aiohttp.InvalidURL, httpx.UnsupportedProtocol),
    (aiohttp.ClientConnectionError, httpx.ReadError),
    (aiohttp.ClientPayloadError, httpx.ReadError),
)
#: What is mapped: aiohttp's errors and its HTTP parser's.
_CAUGHT = (aiohttp.ClientError, HttpProcessingError)


def _mapped(exc: Exception, request: httpx.Request) -> httpx.TransportError:
    """httpx's public exception for one of aiohttp's (a bare TransportError if unknown)."""
    kind = next((to for origin, to in _ERRORS if isinstance(exc, origin)),
                httpx.TransportError)
    return kind(str(exc) or type(exc).__name__, request=request)


class _ResponseStream(httpx.AsyncByteStream):
    """The body of one aiohttp response, read as it arrives; ``aclose`` ends it."""

    def __init__(self, response: aiohttp.ClientResponse, request: httpx.Request) -> None:
        self._response = response
        self._request = request

    async def __aiter__(self) -> AsyncIterator[bytes]:
        content = self._response.content
        try:
            # readany: whatever has arrived (a small completion is one chunk).
            chunk = await content.readany()
            while chunk:
                yield chunk
                chunk = await content.readany()
        except _CAUGHT as exc:
            raise _mapped(exc, self._request) from exc

    async def aclose(self) -> None:
        # A complete body has already handed the connection back to the pool; an
        # incomplete one is closed here, so the server sees the client go away.
        self._response.close()


class AiohttpTransport(httpx.AsyncBaseTransport):
    """An ``httpx.AsyncBaseTransport`` on one aiohttp session (created on first use)."""

    def __init__(self, *, limits: httpx.Limits | None = None,
                 verify: ssl.SSLContext | bool = True) -> None:
        self._limits = limits or httpx.Limits()
        self._verify = verify
        self._session: aiohttp.ClientSession | None = None
        # One-entry caches: a backend sends every request to the same URL, and most with
        # the same timeouts (parsing and building these again costs ~5% of a call).
        self._url: tuple[httpx.URL, yarl.URL, ssl.SSLContext | bool] | None = None
        self._ssl_context: ssl.SSLContext | None = None
        self._timeout: tuple[tuple[float | None, ...], aiohttp.ClientTimeout] | None = None

    def _new_session(self) -> aiohttp.ClientSession:
        """A session that leaves cookies, redirects and decoding to httpx, as a transport must."""
        limits = self._limits
        connector = aiohttp.TCPConnector(limit=limits.max_connections or 0,
                                         keepalive_timeout=limits.keepalive_expiry or 5.0)
        return aiohttp.ClientSession(connector=connector, cookie_jar=aiohttp.DummyCookieJar(),
                                     auto_decompress=False, trust_env=False)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        session = self._session
        if session is None:
            session = self._session = self._new_session()
        url, tls = self._target(request.url)
        body = _request_body(request)  # (first: it may drop a header)
        try:
            response = await session.request(
                request.method, url, ssl=tls, headers=_str_headers(request.headers), data=body,
                allow_redirects=False,
                timeout=self._client_timeout(request.extensions.get("timeout", {})),
                server_hostname=request.extensions.get("sni_hostname"),
            )
        except _CAUGHT as exc:
            raise _mapped(exc, request) from exc
        return httpx.Response(
            response.status, headers=response.raw_headers,
            stream=_ResponseStream(response, request), request=request,
            extensions={"http_version": b"HTTP/1.1",
                        "reason_phrase": (response.reason or "").encode()})

    def _target(self, url: httpx.URL) -> tuple[yarl.URL, ssl.SSLContext | bool]:
        """aiohttp's URL, and its TLS setting: httpx's trust store (certifi), as httpx's own
        transport would use, made on the first https request (it costs ~25 ms)."""
        cached = self._url
        if cached is None or cached[0] is not url:  # the cache holds it: no id reuse
            tls: ssl.SSLContext | bool = True  # (plain http: unused)
            if url.scheme == "https":
                tls = self._verify
                if tls is True:
                    if self._ssl_context is None:
                        self._ssl_context = httpx.create_ssl_context()
                    tls = self._ssl_context
            cached = self._url = (url, yarl.URL(str(url), encoded=True), tls)
        return cached[1], cached[2]

    def _client_timeout(self, timeout: dict[str, float | None]) -> aiohttp.ClientTimeout:
        """httpx's timeouts as aiohttp's: ``pool`` bounds getting a connection (waiting for
        a free one included), ``connect`` opening one, ``read`` each wait for bytes."""
        key = (timeout.get("pool"), timeout.get("connect"), timeout.get("read"))
        cached = self._timeout
        if cached is None or cached[0] != key:
            cached = self._timeout = (key, aiohttp.ClientTimeout(
                total=None, connect=key[0], sock_connect=key[1], sock_read=key[2]))
        return cached[1]

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


def _str_headers(headers: httpx.Headers) -> list[tuple[str, str]]:
    """The headers as aiohttp takes them (it encodes them as UTF-8 again)."""
    try:
        return [(key.decode(), value.decode()) for key, value in headers.raw]
    except UnicodeDecodeError:
        return headers.multi_items()


def _request_body(request: httpx.Request) -> bytes | AsyncIterator[bytes] | None:
    """The request's body as aiohttp takes it: bytes if read, else streamed."""
    try:
        return request.content or None
    except httpx.RequestNotRead:
        # aiohttp frames a streamed body itself (chunked)
        request.headers.pop("transfer-encoding", None)
        return _aiter(request.stream)


async def _aiter(stream: httpx.SyncByteStream | httpx.AsyncByteStream) -> AsyncIterator[bytes]:
    """An async body stream (a sync one cannot be sent from an async transport)."""
    if not isinstance(stream, httpx.AsyncByteStream):
        raise RuntimeError("an async transport needs an async request stream")
    async for chunk in stream:
        yield chunk
