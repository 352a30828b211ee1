"""Pure request checks: validate_request (work queue) and triage_failure (dead letters)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from pipeline import protocol as p
from pipeline.broker.names import Names
from pipeline.dispatch.decide import validate_request
from pipeline.models import ChatRequest
from pipeline.outcome import Failure
from pipeline.settings import BackendSettings, PoolSettings
from pipeline.worker.triage import triage_failure

POOL = PoolSettings(name="chat", models=["mock-small", "mock-large"],
                    backends=[BackendSettings(name="b1", url="http://127.0.0.1:9/v1",
                                              max_concurrency=2)])
LIMIT = 4096


def body(**fields: Any) -> bytes:
    data: dict[str, Any] = {"model": "mock-small",
                            "messages": [{"role": "user", "content": "hello"}]}
    data.update(fields)
    return json.dumps({k: v for k, v in data.items() if v is not ...}).encode()


def check(raw: bytes, *, content_type: str | None = "application/json",
          reply_to_ok: bool = True, correlation_id: str | None = "req-1",
          max_body_bytes: int = LIMIT) -> ChatRequest | Failure:
    return validate_request(raw, content_type=content_type, reply_to_ok=reply_to_ok,
                            correlation_id=correlation_id, pool=POOL,
                            max_body_bytes=max_body_bytes)


def failure(raw: bytes, **kwargs: Any) -> Failure:
    result = check(raw, **kwargs)
    assert isinstance(result, Failure), result
    # Every validation failure is answered as invalid_request.
    assert result.code is p.ErrorCode.INVALID_REQUEST
    return result


# -- validate_request ----------------------------------------------------------------


def test_a_valid_request_passes_with_its_extra_fields() -> None:
    result = check(body(max_tokens=16, temperature=0.2, top_p=0.9, user="u-1"))
    assert isinstance(result, ChatRequest)
    assert result.model == "mock-small"
    assert result.messages[0].role == "user"
    assert result.messages[0].content == "hello"
    assert result.max_tokens == 16
    # Unknown OpenAI fields are kept as sent, for the backend.
    assert result.model_dump()["top_p"] == 0.9


@pytest.mark.parametrize("content_type", [None, "", "application/json",
                                          "Application/JSON; charset=utf-8"])
def test_json_content_types_and_unset_are_accepted(content_type: str | None) -> None:
    assert isinstance(check(body(), content_type=content_type), ChatRequest)


def test_no_reply_to() -> None:
    result = failure(body(), reply_to_ok=False)
    assert result.reason is p.ParkReason.NO_REPLY_TO
    assert "reply_to" in result.message


@pytest.mark.parametrize("correlation_id", [None, ""])
def test_no_correlation_id(correlation_id: str | None) -> None:
    result = failure(body(), correlation_id=correlation_id)
    assert result.reason is p.ParkReason.INVALID_REQUEST
    assert "correlation_id" in result.message


def test_reply_to_is_checked_first() -> None:
    # Nothing else matters if nobody can be answered.
    result = failure(b"\xff" * (LIMIT + 1), reply_to_ok=False, correlation_id=None)
    assert result.reason is p.ParkReason.NO_REPLY_TO


def test_too_large() -> None:
    raw = body(messages=[{"role": "user", "content": "x" * LIMIT}])
    result = failure(raw)
    assert result.reason is p.ParkReason.TOO_LARGE
    assert str(len(raw)) in result.message and str(LIMIT) in result.message
    # Exactly at the limit is fine.
    padded = body(messages=[{"role": "user", "content": "x"}])
    assert isinstance(check(padded, max_body_bytes=len(padded)), ChatRequest)


@pytest.mark.parametrize("content_type", ["text/plain", "application/xml",
                                          "application/x-msgpack"])
def test_wrong_content_type(content_type: str) -> None:
    result = failure(body(), content_type=content_type)
    assert result.reason is p.ParkReason.INVALID_REQUEST
    assert content_type in result.message


@pytest.mark.parametrize("raw", [b"", b"{not json", b'{"model": "mock-small",', b"null x"])
def test_invalid_json(raw: bytes) -> None:
    result = failure(raw)
    assert result.reason is p.ParkReason.INVALID_JSON
    assert "not valid JSON" in result.message


@pytest.mark.parametrize("raw", [
    b"\xff\xfe\x00",
    b'{"model": "mock-small", "messages": [{"role": "user", "content": "caf\xe9"}]}',
])
def test_invalid_utf8(raw: bytes) -> None:
    result = failure(raw)
    assert result.reason is p.ParkReason.INVALID_JSON


@pytest.mark.parametrize(("raw", "where"), [
    (body(messages=...), "messages"),
    (body(messages=[]), "messages"),
    (body(messages="hello"), "messages"),
    (body(messages=[{"content": "no role"}]), "messages.0.role"),
    (body(model=...), "model"),
    (body(model=""), "model"),
    (body(max_tokens=0), "max_tokens"),
    (body(temperature=5), "temperature"),
    (b"[1, 2]", "body"),
    (b'"just a string"', "body"),
])
def test_wrong_shape(raw: bytes, where: str) -> None:
    result = failure(raw)
    assert result.reason is p.ParkReason.INVALID_REQUEST
    assert result.message.startswith(f"not a valid chat completions request: {where}: ")


def test_model_of_another_pool() -> None:
    result = failure(body(model="gpt-4o"))
    assert result.reason is p.ParkReason.INVALID_REQUEST
    assert "'gpt-4o'" in result.message and "'chat'" in result.message
    assert "mock-small" in result.message


@pytest.mark.parametrize(("fields", "param"), [
    ({"temperature": "hot"}, "temperature"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages.[0].content"),
    ({"messages": []}, "messages"),
    ({"stop": ["a"] * 5}, "stop"),
    ({"model": "gpt-4o"}, "model"),
])
def test_a_validation_error_names_its_field_in_param(fields: dict[str, Any], param: str
                                                     ) -> None:
    """As OpenAI does: a client can act on ``error.param``, not parse the message."""
    result = check(body(**fields))
    assert isinstance(result, Failure) and result.code is p.ErrorCode.INVALID_REQUEST
    assert result.extra == {"param": param}
    assert json.loads(p.error_body(result.code, result.message, **result.extra))[
        "error"]["param"] == param


def test_stream_must_be_a_boolean_and_its_options_an_object() -> None:
    for bad in ({"stream": "true"}, {"stream": 1}, {"stream": True, "stream_options": 5},
                {"stream": True, "stream_options": {"include_usage": "yes"}}):
        result = failure(body(**bad))
        assert result.reason is p.ParkReason.INVALID_REQUEST
        assert "stream" in result.message, bad
    for good in ({"stream": False}, {"stream": True},
                 {"stream": True, "stream_options": {"include_usage": True}},
                 {"stream": None}, {"stream": None, "stream_options": None}):
        assert isinstance(check(body(**good)), ChatRequest)
    # OpenAI's schema allows null for stream: not a stream.
    nulled = check(body(stream=None))
    assert isinstance(nulled, ChatRequest) and nulled.stream is False


# -- triage_failure ------------------------------------------------------------------

NAMES = Names("llm")


def x_death(reason: str | bytes, queue: str | bytes = "llm.work.chat",
            routing_key: str | bytes = "mock-small") -> list[dict[str, Any]]:
    """The x-death header as RabbitMQ sends it (newest death first)."""
    return [{"reason": reason, "queue": queue, "routing-keys": [routing_key], "count": 1,
             "exchange": "llm.requests", "time": 1_700_000_000}]


def test_triage_unknown_model() -> None:
    result, pool = triage_failure({}, "gpt-9", NAMES)
    assert (result.reason, result.code) == (p.ParkReason.UNKNOWN_MODEL,
                                            p.ErrorCode.UNKNOWN_MODEL)
    assert result.message == "no pool serves model 'gpt-9'"
    assert pool == "-"


def test_triage_unknown_model_without_routing_key() -> None:
    result, _ = triage_failure({}, None, NAMES)
    assert result.code is p.ErrorCode.UNKNOWN_MODEL
    assert result.message == "no pool serves model ''"


@pytest.mark.parametrize("as_bytes", [False, True])
def test_triage_expired(as_bytes: bool) -> None:
    headers = {"x-death": x_death(b"expired" if as_bytes else "expired",
                                  b"llm.work.chat" if as_bytes else "llm.work.chat")}
    # The routing key of the triage delivery is the DLX's; x-death has the original.
    result, pool = triage_failure(headers, "ignored-routing-key", NAMES)
    assert (result.reason, result.code) == (p.ParkReason.DEADLINE_EXCEEDED,
                                            p.ErrorCode.DEADLINE_EXCEEDED)
    assert "expired" in result.message and "'llm.work.chat'" in result.message
    assert pool == "chat"


@pytest.mark.parametrize("as_bytes", [False, True])
def test_triage_maxlen(as_bytes: bool) -> None:
    headers = {"x-death": x_death(b"maxlen" if as_bytes else "maxlen", "llm.work.big-pool",
                                  b"mock-large" if as_bytes else "mock-large")}
    result, pool = triage_failure(headers, None, NAMES)
    assert (result.reason, result.code) == (p.ParkReason.QUEUE_FULL, p.ErrorCode.QUEUE_FULL)
    assert "'llm.work.big-pool' is full" in result.message
    assert pool == "big-pool"


def test_triage_rejected() -> None:
    result, pool = triage_failure({"x-death": x_death("rejected")}, None, NAMES)
    assert (result.reason, result.code) == (p.ParkReason.REJECTED, p.ErrorCode.BACKEND_ERROR)
    assert pool == "chat"


def test_triage_follows_the_prefix() -> None:
    headers = {"x-death": x_death("expired", "acme.work.chat")}
    _, pool = triage_failure(headers, None, Names("acme"))
    assert pool == "chat"


@pytest.mark.parametrize("bad", [
    {"top_p": "bad"}, {"top_p": 1.5}, {"temperature": "0.7"}, {"max_tokens": "12"},
    {"max_tokens": 0}, {"n": 0}, {"n": "2"}, {"stop": 5}, {"stop": ["a", "b", "c", "d", "e"]},
    {"seed": 1.5}, {"presence_penalty": 3}, {"logprobs": "yes"}, {"top_logprobs": 21},
    {"logit_bias": {"42": "up"}}, {"tools": "none"}, {"response_format": "json"},
    {"parallel_tool_calls": 1},
])
def test_openai_typed_fields_are_checked_before_any_backend(bad: dict[str, Any]) -> None:
    result = failure(body(**bad))
    assert result.reason is p.ParkReason.INVALID_REQUEST
    assert next(iter(bad)) in result.message, (bad, result.message)


def test_valid_openai_fields_and_unknown_ones_pass() -> None:
    assert isinstance(check(body(top_p=1, temperature=0, n=2, stop=["\n"], seed=7,
                                 logit_bias={"42": -100}, logprobs=True, top_logprobs=3,
                                 tools=[{"type": "function"}], tool_choice="auto",
                                 response_format={"type": "json_object"},
                                 vendor_extension={"anything": [1, 2]})), ChatRequest)


def test_a_quorum_delivery_limit_death_is_its_own_reason() -> None:
    headers = {"x-death": [{"reason": "delivery_limit", "queue": "llm.work.chat",
                            "routing-keys": ["mock-small"]}]}
    failure, pool = triage_failure(headers, "mock-small", NAMES, "llm.dlx")
    assert (failure.reason, failure.code, pool) == (
        p.ParkReason.DELIVERY_LIMIT, p.ErrorCode.BACKEND_ERROR, "chat")
    assert "delivery-limit" in failure.message
