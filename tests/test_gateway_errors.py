"""What a backend says of a refused call reaches the HTTP client (issue 11 item 4, issue 12).

The backend is an httpx.MockTransport plugged into the worker's transport seam (as in
tests/test_failures.py): it answers 400 with OpenAI's own context-length error, or 500
with a detailed server error. The broker, the worker and the gateway are real; the
official `openai` SDK reads the answer.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import httpx
import openai
import pytest

from pipeline.broker.topology import apply_topology
from pipeline.gateway.server import GatewayServer
from tests.conftest import SettingsFactory, running_worker

HELLO = [{"role": "user", "content": "hello there"}]

#: What OpenAI (and vLLM, LiteLLM) answer to a prompt longer than the context window.
CONTEXT_ERROR = {"error": {
    "message": "This model's maximum context length is 8192 tokens. However, your "
               "messages resulted in 9000 tokens. Please reduce the length of the messages.",
    "type": "invalid_request_error", "param": "messages", "code": "context_length_exceeded"}}
SERVER_ERROR = {"error": {"message": "the GPU fell over", "type": "server_error",
                          "param": "model", "code": "gpu_gone"}}


class ScriptedBackend:
    """Answers every call with ``status`` and ``body``; counts the calls."""

    def __init__(self, status: int, body: dict[str, Any]) -> None:
        self.status, self.body, self.calls = status, body, 0

    def handler(self, request: httpx.Request) -> httpx.Response:
        self.calls += 1
        return httpx.Response(self.status, json=self.body)


@contextlib.asynccontextmanager
async def scripted_gateway(make_settings: SettingsFactory, backend: ScriptedBackend
                           ) -> AsyncIterator[openai.AsyncOpenAI]:
    """A worker whose one backend is ``backend``, and a gateway in open mode before it."""
    settings = make_settings([("b1", "http://backend.invalid/v1", 2)],
                             pool={"max_attempts": 2, "retry_delays_ms": []})
    await apply_topology(settings)
    async with running_worker(settings, transport_factory=lambda _: httpx.MockTransport(
            backend.handler)), GatewayServer(settings, host="127.0.0.1", port=0) as server:
        yield openai.AsyncOpenAI(base_url=server.base_url, api_key="any", max_retries=0)


@pytest.mark.parametrize("stream", [False, True])
async def test_a_context_length_error_reaches_the_sdk_as_the_backend_said_it(
        make_settings: SettingsFactory, stream: bool) -> None:
    backend = ScriptedBackend(400, CONTEXT_ERROR)
    async with scripted_gateway(make_settings, backend) as client:
        with pytest.raises(openai.BadRequestError) as refused:
            await client.chat.completions.create(
                model="mock-small", messages=HELLO, stream=stream)  # type: ignore[call-overload]
    error = refused.value
    assert error.status_code == 400
    assert (error.code, error.param, error.type) == (
        "context_length_exceeded", "messages", "invalid_request_error")
    body = error.body
    assert isinstance(body, dict)
    assert body["hutch_code"] == "invalid_request"
    assert body["status"] == 400
    assert body["backend"] == {"type": "invalid_request_error",
                               "code": "context_length_exceeded", "param": "messages"}
    assert "maximum context length is 8192 tokens" in body["message"]
    assert backend.calls == 1  # the request's fault: never retried


async def test_a_backend_failure_keeps_hutch_code_and_passes_the_backend_fields(
        make_settings: SettingsFactory) -> None:
    backend = ScriptedBackend(500, SERVER_ERROR)
    async with scripted_gateway(make_settings, backend) as client:
        with pytest.raises(openai.InternalServerError) as failed:
            await client.chat.completions.create(model="mock-small", messages=HELLO)  # type: ignore[arg-type]
    error = failed.value
    assert error.status_code == 502
    assert (error.code, error.param) == ("backend_error", "model")
    body = error.body
    assert isinstance(body, dict)
    assert body["status"] == 500
    assert body["backend"] == {"type": "server_error", "code": "gpu_gone", "param": "model"}
    assert "hutch_code" not in body  # the code is Hutch's own already


def test_error_bodies_without_backend_fields_are_unchanged() -> None:
    from pipeline.errors import InvalidRequestError
    from pipeline.gateway.responses import error_body

    error = InvalidRequestError("messages must not be empty", type="invalid_request_error")
    assert error_body(error) == {"error": {
        "message": "messages must not be empty", "type": "invalid_request_error",
        "param": None, "code": "invalid_request"}}
    coded = InvalidRequestError("too long", backend={"code": 400, "type": "exceed_context"},
                                status=400)
    detail = error_body(coded)["error"]
    # llama.cpp's numeric code stays under `backend`; its string type comes up.
    assert (detail["code"], detail["type"], detail["hutch_code"]) == (
        "invalid_request", "exceed_context", "invalid_request")
