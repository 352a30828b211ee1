"""Calling one OpenAI-compatible backend over HTTP.

A :class:`Backend` sends a chat request and either returns the completion or raises one
of the worker-side errors of :mod:`pipeline.errors`, classified once here:
connection failures, timeouts, 408 and 5xx are retryable, 429 is throttling, any other
4xx is terminal. It speaks through httpx's API on an aiohttp transport: httpx's default
transport costs about 8x in throughput on this path (see the design brief), and tests
swap in ``httpx.MockTransport`` through the same seam.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import aiohttp
import httpx
from httpx_aiohttp import AiohttpTransport
from pydantic import ValidationError

from pipeline.errors import RetryableError, TerminalError, ThrottledError
from pipeline.models import ChatCompletion
from pipeline.settings import BackendSettings

__all__ = ["Backend", "BackendResult", "parse_retry_after"]

_CHAT_PATH = "/chat/completions"


@dataclass(frozen=True)
class BackendResult:
    """A successful call: the completion as the backend sent it, and how long it took."""

    body: bytes
    completion: ChatCompletion
    elapsed_s: float


def parse_retry_after(value: str | None) -> float | None:
    """Seconds from a ``Retry-After`` header (delta-seconds form only), or None."""
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        return None
    # "inf" or "nan" would park a request (and its backend slot) forever.
    return seconds if math.isfinite(seconds) and seconds >= 0 else None


def _error_message(response: httpx.Response) -> str:
    """The backend's own error message if it sent an OpenAI error, else the raw text."""
    try:
        data = response.json()
        message = data["error"]["message"]
        if isinstance(message, str):
            return message[:500]
    except (ValueError, KeyError, TypeError):
        pass
    return response.text[:500] or response.reason_phrase


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
        self._url = self._http.build_request("POST", _CHAT_PATH).url
        self._headers = self._http.headers.raw
        self._default_timeout = httpx.Timeout(settings.timeout_s).as_dict()
        #: Whether a backend ever set a cookie (testing the jar itself costs a lock).
        self._cookies = False

    async def aclose(self) -> None:
        await self._http.aclose()

    def _redact(self, message: str) -> str:
        """Error texts may echo what was sent (proxies repeat the key): never the key."""
        return message.replace(self._api_key, "***") if self._api_key else message

    async def chat(self, body: bytes, *, timeout_s: float | None = None,
                   request_id: str | None = None) -> BackendResult:
        """POST ``/chat/completions``; ``timeout_s`` may shorten the configured timeout."""
        timeout = self.settings.timeout_s if timeout_s is None else min(
            timeout_s, self.settings.timeout_s)
        headers = self._headers
        if request_id:
            # ascii, as httpx encodes a str header (a non-ascii id fails the same way)
            headers = [*headers, (b"x-request-id", request_id.encode("ascii"))]
        # Cookies, as the client would keep them: only if a backend set some (a sticky LB).
        cookies = self._http.cookies if self._cookies else None
        request = httpx.Request("POST", self._url, headers=headers, content=body,
                                cookies=cookies,
                                extensions={"timeout": self._default_timeout
                                            if timeout == self.settings.timeout_s
                                            else httpx.Timeout(timeout).as_dict()})
        started = time.monotonic()
        try:
            response = await self._transport.handle_async_request(request)
            response.request = request  # as the client does (not every transport sets it)
            try:
                await response.aread()
            finally:
                await response.aclose()
        except httpx.HTTPError as exc:
            # httpx-aiohttp maps a refused connection to ConnectTimeout: look at the cause.
            refused = isinstance(exc.__cause__, aiohttp.ClientConnectorError)
            if isinstance(exc, httpx.TimeoutException) and not refused:
                raise RetryableError(
                    f"backend {self.name} timed out after {timeout:.1f}s") from None
            reason = exc.__cause__ if refused else exc
            raise RetryableError(self._redact(
                f"backend {self.name} unreachable: {type(reason).__name__}: {reason}")) from None
        if "set-cookie" in response.headers:
            self._http.cookies.extract_cookies(response)
            self._cookies = True
        elapsed = time.monotonic() - started
        status = response.status_code
        if status == 200:
            try:
                completion = ChatCompletion.model_validate_json(response.content)
            except ValidationError as exc:
                raise RetryableError(
                    f"backend {self.name} returned an invalid completion: "
                    f"{exc.errors()[0]['msg']}", status=status) from None
            return BackendResult(response.content, completion, elapsed)
        message = self._redact(
            f"backend {self.name} answered HTTP {status}: {_error_message(response)}")
        if status == 429:
            raise ThrottledError(
                message, retry_after_s=parse_retry_after(response.headers.get("retry-after")))
        if status == 408 or status >= 500:
            raise RetryableError(message, status=status)
        raise TerminalError(message, status=status)

