"""Requests aiohttp refuses before any handler runs, answered as OpenAI would.

A header over the size limit, a duplicate ``Content-Length``, a TLS handshake sent to the
plain-HTTP port, garbage: aiohttp answers these itself, in plain text, and logs each with a
traceback whose message quotes the request's bytes (headers, keys included). Here each gets
an OpenAI-shaped error body and one log line (``gateway.bad_http``: status, error class,
peer), never the request's text: the answer's message is ours, chosen by the error's class.
"""

from __future__ import annotations

import re

from aiohttp import http_exceptions, web

from pipeline.gateway.calls import refusal
from pipeline.gateway.responses import error_response
from pipeline.observe.log import get_logger

__all__ = ["GatewayRunner", "explain"]

log = get_logger("hutch.gateway")

#: What a non-HTTP first line raises (aiohttp before 3.10.6 raised BadStatusLine for it).
_BAD_METHOD: type[Exception] = getattr(http_exceptions, "BadHttpMethod",
                                       http_exceptions.BadStatusLine)
#: aiohttp's parser messages that are its own words (llhttp's descriptions), safe to quote.
_OWN_WORDS = re.compile(r"[A-Za-z][A-Za-z -]{0,79}")


def explain(error: BaseException | None, status: int) -> str:
    """What to tell the client of a request aiohttp refused (never the request's bytes)."""
    if isinstance(error, http_exceptions.LineTooLong):
        return "the request line or a header is too long (limit: 8190 bytes)"
    if isinstance(error, _BAD_METHOD):
        return ("not an HTTP request (is a client speaking TLS, https://, to this "
                "plain-HTTP port?)")
    if isinstance(error, http_exceptions.InvalidHeader):
        return "a header of the request is malformed"
    if isinstance(error, http_exceptions.BadStatusLine | http_exceptions.InvalidURLError):
        return "the request line is malformed"
    if isinstance(error, http_exceptions.HttpProcessingError):
        first = (error.message or "").split(":", 1)[0].strip()
        detail = f": {first}" if _OWN_WORDS.fullmatch(first) else ""
        return f"malformed HTTP request{detail}"
    if status >= 500:
        return "the gateway failed to answer this request"
    return "malformed HTTP request"


class _Handler(web.RequestHandler):
    """aiohttp's connection handler, with OpenAI-shaped errors and a quiet log."""

    def handle_error(self, request: web.BaseRequest, status: int = 500,
                     exc: BaseException | None = None, message: str | None = None
                     ) -> web.StreamResponse:
        if request.writer.output_size > 0:  # as aiohttp's: the answer has begun
            raise ConnectionError("the response has begun: no error can follow")
        log.info("gateway.bad_http", status=status, peer=request.remote,
                 error=type(exc).__name__ if exc is not None else None)
        code, kind = (("internal_error", "api_error") if status >= 500
                      else ("invalid_request", "invalid_request_error"))
        response = error_response(refusal(status, explain(exc, status), code=code, type=kind),
                                  correlation_id=None, retry_after_s=0)
        response.force_close()
        return response


class _Server(web.Server):
    def __call__(self) -> web.RequestHandler:
        return _Handler(self, loop=self._loop, **self._kwargs)


class GatewayRunner(web.AppRunner):
    """An AppRunner whose connections are handled by :class:`_Handler`."""

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        # The app built it with the runner's options; only the handler class differs.
        server.__class__ = _Server
        return server
