"""Property-based tests (Hypothesis) of the HTTP gateway in front of a live worker.

Hypothesis draws batches of HTTP requests: API keys right, wrong, missing, not UTF-8 or
huge; every ``Content-Type``; ``x-hutch-priority`` and ``x-hutch-timeout`` of wrong types
and ranges, and a body ``priority``; bodies of every kind the wire tests send (not JSON,
UTF-16, a byte-order mark, nested too deep, empty, oversized, every OpenAI field with a
wrong value). One gateway and one worker serve the whole module (the in-process aiohttp
app on the real broker). Each request must get the status and ``error.code``
docs/gateway.md gives (derived below from the request alone, in the order the gateway
checks), in OpenAI's error shape; a completion where the request was valid; never a 500;
the gateway and the worker keep serving, and valid requests sent alongside are answered.
"""

from __future__ import annotations

import asyncio
import json
import os
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import pytest_asyncio
from hypothesis import strategies as st

from hutch_bench.scenarios.fuzz_cases import MODELS, PLACEHOLDER, WireShape, bodies
from hutch_bench.scenarios.fuzz_drive import check_examples
from hutch_bench.scenarios.fuzz_rig import MAX_BODY_BYTES, wire_settings
from pipeline.broker.topology import apply_topology
from pipeline.gateway.server import GatewayServer
from pipeline.runtime.background import running
from pipeline.testing.mock import MockBackend, MockConfig
from pipeline.worker.worker import Worker

pytestmark = pytest.mark.asyncio(loop_scope="module")

EXAMPLES = int(os.environ.get("HUTCH_PROPERTY_EXAMPLES", "50"))
KEY = "sk-prop-0123456789abcdef"
CHAT = "/v1/chat/completions"
#: The errors the gateway answers itself: status -> error.code (docs/gateway.md).
CODES = {401: "invalid_api_key", 404: "model_not_found", 413: "request_too_large",
         415: "unsupported_media_type", 400: "invalid_request"}


@dataclass
class Call:
    """One HTTP request, and the answer docs/gateway.md gives it."""

    method: str
    path: str
    headers: dict[str, Any]
    body: bytes
    body_class: str
    too_large: bool
    kind: str
    status: int = 0


def _priority_bad(header: str | None, body: Any) -> bool:
    if header is not None:
        try:
            value = float(header)
        except ValueError:
            return True
        return not (value == value and abs(value) != float("inf") and value.is_integer())
    field = body.get("priority") if isinstance(body, dict) else None
    return field is not None and (isinstance(field, bool) or not isinstance(field, int))


def _timeout_bad(header: str | None) -> bool:
    if header is None:
        return False
    try:
        value = float(header)
    except ValueError:
        return True
    return not 0 < value <= 3600


def _expect(call: Call) -> int:
    """The status the gateway's documentation gives, in the order it checks."""
    scheme, _, token = str(call.headers.get("Authorization", "")).partition(" ")
    if scheme.lower() != "bearer" or token != KEY:  # the scheme is case-insensitive (RFC 7235)
        return 401
    if call.method == "GET":
        return 200
    if call.headers.get("Content-Type", "").split(";")[0].strip().lower() != (
            "application/json"):
        return 415
    if call.too_large:
        return 413
    if call.body_class == "invalid_json":
        return 400
    body = json.loads(call.body)
    if not isinstance(body, dict):
        return 400
    if body.get("stream") is not None and not isinstance(body["stream"], bool):
        return 400
    if _priority_bad(call.headers.get("x-hutch-priority"), body):
        return 400
    model = body.get("model")
    if not isinstance(model, str) or not model:
        return 400
    if model not in MODELS:
        return 404
    if _timeout_bad(call.headers.get("x-hutch-timeout")):
        return 400
    # Published: the worker refuses what OpenAI's schema refuses, the backend the rest.
    return 200 if call.body_class == "valid" else 400


_AUTH = st.sampled_from([f"Bearer {KEY}"] * 6 + [
    None, "", "Bearer", f"Bearer {KEY}x", f"bearer {KEY}", "Bearer sk-wrong", KEY,
    b"Bearer sk-\xff\xfe\x80", "Basic dXNlcjpwYXNz"])
_CONTENT_TYPE = st.sampled_from(["application/json"] * 5 + [
    None, "application/json; charset=utf-8", "APPLICATION/JSON", "text/plain",
    "application/x-www-form-urlencoded", "multipart/form-data", "json", ""])
_PRIORITY = st.sampled_from([None] * 4 + ["0", "5", "255", "1000", "-3", "1e3", "1.5",
                                          "abc", "nan", "inf", "+7", ""])
_TIMEOUT = st.sampled_from([None] * 4 + ["30", "120.5", "0", "-1", "1e9", "nan", "soon",
                                         "3600", "3601"])
_BODY_PRIORITY = st.sampled_from([None] * 4 + [3, 300, "3", 1.5, True, [], -1])


@st.composite
def _call(draw: st.DrawFn, shape: WireShape) -> Call:
    headers: dict[str, Any] = {}
    for name, strategy in (("Authorization", _AUTH), ("Content-Type", _CONTENT_TYPE),
                           ("x-hutch-priority", _PRIORITY), ("x-hutch-timeout", _TIMEOUT)):
        value = draw(strategy)
        if value is not None:
            headers[name] = value
    if draw(st.integers(0, 19)) == 0:
        # Under or well over the gateway's 8190-byte header limit.
        headers["X-Padding"] = "a" * draw(st.sampled_from([100, 4_000, 10_000, 20_000]))
    if draw(st.integers(0, 9)) == 0:
        return Call("GET", "/v1/models", headers, b"", "valid", False, "models")
    body, body_class, too_large, kind = draw(bodies(shape))
    priority = draw(_BODY_PRIORITY)
    if priority is not None and body_class != "invalid_json":
        parsed = json.loads(body)
        if isinstance(parsed, dict):
            body = json.dumps({**parsed, "priority": priority}).encode()
    return Call("POST", CHAT, headers, body, body_class, too_large, kind)


@dataclass
class HttpRig:
    """One gateway and one worker; checks batches of calls."""

    http: httpx.AsyncClient
    shape: WireShape
    gateway: GatewayServer
    worker_task: asyncio.Task[None]
    stall_s: float = 20.0
    calls: int = 0
    valid_sent: int = 0

    def strategy(self) -> st.SearchStrategy[list[Call]]:
        return st.lists(_call(self.shape), min_size=1, max_size=12)

    async def _send(self, call: Call, n: int) -> list[str]:
        body = call.body.replace(PLACEHOLDER.encode(), f"h{n:08d}".encode())
        try:
            response = await self.http.request(call.method, call.path, content=body,
                                               headers=call.headers)
        except httpx.HTTPError as exc:
            return [f"{call.kind} {call.headers}: {exc!r}"]
        return self._judge(call, response, n)

    def _judge(self, call: Call, response: httpx.Response, n: int) -> list[str]:
        huge = len(call.headers.get("X-Padding", "")) > 8_000
        want = _expect(call)
        what = f"{call.method} {call.kind} {call.headers if not huge else 'huge header'}"
        if huge:  # aiohttp refuses it before any handler: 400 or 431, OpenAI-shaped
            if response.status_code not in (400, 431):
                return [f"{what}: {response.status_code}, expected 400/431"]
            want = response.status_code
        elif response.status_code != want:
            return [f"{what}: {response.status_code} {response.text[:200]!r}, expected {want}"]
        if want == 200:
            if call.method == "GET":
                return [] if response.json()["object"] == "list" else [f"{what}: {response.text}"]
            content = response.json()["choices"][0]["message"]["content"]
            return [] if content.endswith(f"h{n:08d}") else [f"{what}: {content!r}"]
        error = response.json().get("error", {})
        if not (error.get("message") and error.get("type") and error.get("code")):
            return [f"{what}: not an OpenAI error: {response.text[:200]!r}"]
        if want in CODES and not huge and error["code"] != CODES[want] and (
                call.body_class != "backend_rejects"):
            return [f"{what}: code {error['code']}, expected {CODES[want]}"]
        return []

    async def _valid(self, n: int) -> list[str]:
        response = await self.http.post(CHAT, json={
            "model": MODELS[n % 2], "messages": [{"role": "user", "content": f"valid {n}"}]},
            headers={"Authorization": f"Bearer {KEY}"})
        if response.status_code != 200:
            return [f"valid request alongside: {response.status_code} {response.text[:200]}"]
        return []

    async def check(self, calls: list[Call]) -> list[str]:
        base = self.calls
        self.calls += len(calls)
        self.valid_sent += 2
        async with asyncio.timeout(self.stall_s):
            results = await asyncio.gather(
                *(self._send(call, base + i) for i, call in enumerate(calls)),
                self._valid(base), self._valid(base + 1))
        problems = [line for result in results for line in result]
        health = await self.http.get("/healthz")
        if health.status_code != 200 or self.worker_task.done():
            problems.append(f"gateway /healthz {health.status_code}, worker stopped: "
                            f"{self.worker_task.done()}")
        return problems


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def rig(amqp_url: str) -> AsyncIterator[HttpRig]:
    prefix = f"t{uuid.uuid4().hex[:8]}"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HUTCH_TEST_PROP_KEY", KEY)
        async with MockBackend(MockConfig(latency_ms=2, capacity=32)) as mock:
            settings = wire_settings(amqp_url, prefix, mock.base_url, gateway={"keys": [
                {"identity": "prop", "key_env": "HUTCH_TEST_PROP_KEY", "max_priority": 9}]})
            await apply_topology(settings)
            worker = Worker(settings)
            async with running(worker.run(), ready=lambda: bool(worker.held_backends()),
                               stop=worker.stop, stop_timeout_s=20) as task, \
                    GatewayServer(settings, host="127.0.0.1", port=0) as gateway, \
                    httpx.AsyncClient(base_url=gateway.base_url.removesuffix("/v1"),
                                      timeout=30) as http:
                shape = WireShape(reply_queue="-", ghost_reply_to="-", forged_reply_tos=("-",),
                                  max_body_bytes=MAX_BODY_BYTES)
                yield HttpRig(http, shape, gateway, task)


async def test_every_http_request_gets_its_documented_answer(rig: HttpRig) -> None:
    loop = asyncio.get_running_loop()
    await asyncio.to_thread(check_examples, rig, loop, examples=EXAMPLES)
    print(f"\ngateway properties: {rig.calls} requests, {rig.valid_sent} valid alongside")
    assert rig.calls >= EXAMPLES
    assert not rig.worker_task.done()
