"""The wire contract: headers, deadlines, dead-letter reasons, error bodies, names."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest

from pipeline import errors as e
from pipeline import protocol as p
from pipeline.broker.names import Names
from pipeline.models import ErrorReply

# -- deadline_ms ----------------------------------------------------------------------


def test_deadline_explicit_header_wins() -> None:
    headers = {p.H_DEADLINE: 1_700_000_123_456}
    assert p.deadline_ms(headers, expiration_s=5.0, timestamp_s=1_700_000_000.0) \
        == 1_700_000_123_456
    assert p.deadline_ms(headers, None, None) == 1_700_000_123_456


@pytest.mark.parametrize("value", [b"1700000123456", "1700000123456", 1700000123456.0])
def test_deadline_header_as_bytes_str_or_float(value: Any) -> None:
    assert p.deadline_ms({p.H_DEADLINE: value}, None, None) == 1_700_000_123_456


def test_deadline_from_expiration_and_timestamp() -> None:
    assert p.deadline_ms({}, expiration_s=2.5, timestamp_s=1_700_000_000.0) \
        == 1_700_000_002_500


@pytest.mark.parametrize("value", [True, "soon", b"", None, [1], {"a": 1}])
def test_unusable_deadline_header_falls_back(value: Any) -> None:
    headers = {p.H_DEADLINE: value}
    assert p.deadline_ms(headers, 1.0, 100.0) == 101_000
    assert p.deadline_ms(headers, None, None) is None


def test_no_deadline() -> None:
    assert p.deadline_ms({}, None, None) is None
    # Only an expiration: the broker alone bounds the wait in the queue.
    assert p.deadline_ms({}, 30.0, None) is None
    # Only a timestamp: nothing to add it to.
    assert p.deadline_ms({}, None, 1_700_000_000.0) is None


# -- sent_at_ms -----------------------------------------------------------------------


def test_sent_at_header_wins() -> None:
    assert p.sent_at_ms({p.H_SENT_AT: 1_700_000_000_123}, 1_600_000_000.0) \
        == 1_700_000_000_123
    assert p.sent_at_ms({p.H_SENT_AT: b"1700000000123"}, None) == 1_700_000_000_123


def test_sent_at_falls_back_to_the_amqp_timestamp() -> None:
    assert p.sent_at_ms({}, 1_700_000_000.0) == 1_700_000_000_000
    assert p.sent_at_ms({p.H_SENT_AT: "garbage"}, 1_700_000_000.5) == 1_700_000_000_500
    assert p.sent_at_ms({}, None) is None


def test_now_ms_is_epoch_milliseconds() -> None:
    before = int(time.time() * 1000)
    now = p.now_ms()
    assert before <= now <= int(time.time() * 1000)


# -- death_reason ---------------------------------------------------------------------


def death(reason: Any, queue: Any = "llm.work.chat", count: int = 1) -> dict[str, Any]:
    """One x-death entry as RabbitMQ writes it."""
    return {"reason": reason, "queue": queue, "count": count, "exchange": "llm.requests",
            "routing-keys": ["mock-small"], "time": 1_700_000_000}


@pytest.mark.parametrize(("reason", "expected"), [
    ("expired", p.ParkReason.DEADLINE_EXCEEDED),
    ("maxlen", p.ParkReason.QUEUE_FULL),
    ("rejected", p.ParkReason.REJECTED),
    (b"expired", p.ParkReason.DEADLINE_EXCEEDED),
    (b"maxlen", p.ParkReason.QUEUE_FULL),
    (b"rejected", p.ParkReason.REJECTED),
    # Quorum queues' delivery limit has a reason of its own; one Hutch does not know is a
    # rejection.
    ("delivery_limit", p.ParkReason.DELIVERY_LIMIT),
    ("some_future_reason", p.ParkReason.REJECTED),
    (None, p.ParkReason.REJECTED),
])
def test_death_reason(reason: Any, expected: p.ParkReason) -> None:
    assert p.death_reason({"x-death": [death(reason)]}) is expected


def test_death_reason_uses_the_most_recent_death() -> None:
    headers = {"x-death": [death("maxlen", "llm.work.b"), death("expired", "llm.work.a")]}
    assert p.death_reason(headers) is p.ParkReason.QUEUE_FULL


@pytest.mark.parametrize("headers", [{}, {"x-death": []}, {"x-death": None},
                                     {"x-death": "expired"}, {"other": 1}])
def test_no_death_means_the_alternate_exchange(headers: dict[str, Any]) -> None:
    assert p.death_reason(headers) is p.ParkReason.UNKNOWN_MODEL


def test_death_entry_that_is_not_a_table() -> None:
    assert p.death_reason({"x-death": ["expired"]}) is p.ParkReason.REJECTED


# -- error bodies ---------------------------------------------------------------------


@pytest.mark.parametrize(("code", "etype"), [
    (p.ErrorCode.QUEUE_FULL, "rate_limit_error"),
    (p.ErrorCode.UNKNOWN_MODEL, "invalid_request_error"),
    (p.ErrorCode.DEADLINE_EXCEEDED, "timeout_error"),
    (p.ErrorCode.INVALID_REQUEST, "invalid_request_error"),
    (p.ErrorCode.BACKEND_ERROR, "api_error"),
    (p.ErrorCode.INTERNAL_ERROR, "api_error"),
])
def test_error_body_shape(code: p.ErrorCode, etype: str) -> None:
    body = p.error_body(code, "it went wrong")
    assert json.loads(body) == {"error": {"type": etype, "code": code.value,
                                          "message": "it went wrong"}}
    # It parses as the typed error reply the client reads.
    reply = ErrorReply.model_validate_json(body)
    assert (reply.error.code, reply.error.type) == (code.value, etype)
    assert p.error_type(code) == etype


def test_error_body_extra_fields_and_unicode() -> None:
    body = p.error_body(p.ErrorCode.BACKEND_ERROR, "modèle «x» a échoué", status=502)
    data = json.loads(body)
    assert data["error"]["status"] == 502
    assert data["error"]["message"] == "modèle «x» a échoué"
    assert isinstance(body, bytes)


def test_every_error_code_has_a_type() -> None:
    for code in p.ErrorCode:
        assert p.error_type(code)


# -- error_for_code -------------------------------------------------------------------


@pytest.mark.parametrize(("code", "cls"), [
    ("queue_full", e.QueueFullError),
    ("unknown_model", e.UnknownModelError),
    ("deadline_exceeded", e.DeadlineExceededError),
    ("invalid_request", e.InvalidRequestError),
    ("backend_error", e.BackendError),
])
def test_error_for_code(code: str, cls: type[e.RequestFailed]) -> None:
    assert e.error_for_code(code) is cls
    assert cls.code == code
    assert issubclass(cls, e.RequestFailed)
    assert issubclass(cls, e.HutchError)


def test_every_wire_code_has_an_exception_class() -> None:
    for code in p.ErrorCode:
        cls = e.error_for_code(code)
        assert cls.code == code.value
        # A class of its own, except the catch-all base class for internal errors.
        assert (cls is e.RequestFailed) == (code.value == e.RequestFailed.code)


def test_unknown_code_maps_to_the_base_class() -> None:
    assert e.error_for_code("something_new") is e.RequestFailed
    failure = e.error_for_code("something_new")("?", code="something_new")
    assert failure.code == "something_new"
    assert e.RequestFailed.code == "internal_error"  # the class default is untouched


def test_request_failed_carries_the_reply_fields() -> None:
    exc = e.QueueFullError("pool chat is full", type="rate_limit_error", status=None)
    assert (exc.code, exc.type, exc.message, str(exc)) == (
        "queue_full", "rate_limit_error", "pool chat is full", "pool chat is full")
    assert e.BackendError("x").type == "hutch_error"


def test_deadline_exceeded_is_a_timeout() -> None:
    with pytest.raises(TimeoutError):
        raise e.DeadlineExceededError("too late")


def test_worker_side_errors() -> None:
    throttled = e.ThrottledError("slow down", retry_after_s=2.0)
    assert isinstance(throttled, e.RetryableError)
    assert (throttled.status, throttled.retry_after_s, throttled.message) == (
        429, 2.0, "slow down")
    terminal = e.TerminalError("bad", status=400)
    assert isinstance(terminal, e.BackendCallError)
    assert not isinstance(terminal, e.RetryableError)
    assert terminal.status == 400


# -- names ----------------------------------------------------------------------------


def test_default_names() -> None:
    names = Names()
    assert names.requests_exchange == "llm.requests"
    assert names.unrouted_exchange == "llm.unrouted"
    assert names.dead_letter_exchange == "llm.dlx"
    assert names.triage_queue == "llm.triage"
    assert names.parked_queue == "llm.parked"
    assert names.work_queue("chat") == "llm.work.chat"
    assert names.work_policy("chat") == "llm.work.chat"
    assert names.reply_queue("app-1") == "llm.reply.app-1"
    assert names.lease_queue("vllm-a") == "llm.lease.vllm-a"


def test_names_follow_the_prefix() -> None:
    names = Names("acme")
    every = [names.requests_exchange, names.unrouted_exchange, names.dead_letter_exchange,
             names.triage_queue, names.parked_queue, names.work_queue("p"),
             names.reply_queue("c"), names.lease_queue("b")]
    assert all(name.startswith("acme.") for name in every)
    assert len(set(every)) == len(every)
    assert Names("acme") == names  # a value object
