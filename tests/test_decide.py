"""The dispatcher's decisions, one test per row of the failure table that a worker decides
(docs/concepts/failures.md) (no broker: these are pure functions over the delivery context)."""

from __future__ import annotations

import json

import pytest

from pipeline import protocol as p
from pipeline.dispatch import decide
from pipeline.errors import (
    BackendCallError,
    BackendNotFoundError,
    RetryableError,
    TerminalError,
    ThrottledError,
)
from pipeline.models import ChatRequest
from pipeline.outcome import Failed, Requeue, RetryLater
from pipeline.settings import PoolSettings
from tests.fakes import chat_body, delivery

POOL = PoolSettings.model_validate({
    "name": "chat", "models": ["small"], "max_attempts": 5, "attempts_per_delivery": 2,
    "retry_delays_ms": [1000, 5000],
    "backends": [{"name": "b1", "url": "http://127.0.0.1:1/v1", "max_concurrency": 2}],
})


def admit(**fields: object) -> object:
    available = bool(fields.pop("available", True))
    wait = float(fields.pop("model_wait_s", 0.0))  # type: ignore[arg-type]
    return decide.admit(delivery(**fields), POOL, max_body_bytes=1000, available=available,
                        model_wait_s=wait)


def failed_reason(outcome: object) -> p.ParkReason:
    assert isinstance(outcome, Failed), outcome
    return outcome.failure.reason


# -- admission ---------------------------------------------------------------------------


def test_a_valid_request_is_admitted() -> None:
    assert isinstance(admit(), ChatRequest)


@pytest.mark.parametrize(("fields", "reason"), [
    ({"body": b"{not json"}, p.ParkReason.INVALID_JSON),
    ({"body": chat_body(messages=[])}, p.ParkReason.INVALID_REQUEST),
    ({"body": chat_body("large")}, p.ParkReason.INVALID_REQUEST),
    ({"body": chat_body(stream="true")}, p.ParkReason.INVALID_REQUEST),
    ({"body": chat_body(pad="x" * 2000)}, p.ParkReason.TOO_LARGE),
    ({"content_type": "text/plain"}, p.ParkReason.INVALID_REQUEST),
    ({"correlation_id": None}, p.ParkReason.INVALID_REQUEST),
    ({"reply_to": None}, p.ParkReason.NO_REPLY_TO),
    ({"reply_to": "llm.work.chat"}, p.ParkReason.NO_REPLY_TO),
    ({"user_id": "app", "reply_to": "llm.reply.other"}, p.ParkReason.FORGED_REPLY_TO),
    ({"deadline_in_s": -1}, p.ParkReason.DEADLINE_EXCEEDED),
])
def test_malformed_forged_or_late_requests_fail_before_any_backend(
        fields: dict[str, object], reason: p.ParkReason) -> None:
    assert failed_reason(admit(**fields)) is reason


def test_a_forged_reply_to_is_not_answerable() -> None:
    d = delivery(user_id="app", reply_to="llm.reply.other")
    assert d.refusal is not None and not d.answerable
    assert delivery(user_id="app", reply_to="llm.reply.app.7").answerable


def test_an_unavailable_backend_hands_the_request_back() -> None:
    assert isinstance(admit(available=False), Requeue)


# -- before an attempt ---------------------------------------------------------------------


def test_before_attempt() -> None:
    assert decide.before_attempt(delivery(), 1, available=True, fastest_s=0.5) is None
    assert isinstance(decide.before_attempt(delivery(), 2, available=False, fastest_s=0),
                      Requeue)
    late = decide.before_attempt(delivery(deadline_in_s=-0.1), 1, available=True,
                                 fastest_s=0)
    assert failed_reason(late) is p.ParkReason.DEADLINE_EXCEEDED
    short = decide.before_attempt(delivery(deadline_in_s=0.2), 1, available=True,
                                  fastest_s=1.0)
    assert failed_reason(short) is p.ParkReason.DEADLINE_EXCEEDED
    assert isinstance(short, Failed) and "fastest recent answer" in short.failure.message


# -- after a failed attempt ------------------------------------------------------------------


def after(error: BackendCallError, number: int = 1, backoff: float = 0.1,
          model_wait_s: float = 0.0, **fields: object) -> object:
    d = delivery(**fields)  # type: ignore[arg-type]
    d.attempts = d.prior_attempts + number
    kind = decide.attempt_kind(d, error)
    return decide.after_failure(d, error, kind, number, POOL, backoff, model_wait_s)


def test_attempt_kinds() -> None:
    assert decide.attempt_kind(delivery(), ThrottledError("429")) == "throttled"
    assert decide.attempt_kind(delivery(), RetryableError("500", status=500)) == "retryable"
    assert decide.attempt_kind(delivery(), TerminalError("400", status=400)) == "terminal"
    assert decide.attempt_kind(delivery(deadline_in_s=-0.01),
                               RetryableError("timed out")) == "deadline"


def test_a_429_goes_back_to_the_queue() -> None:
    assert isinstance(after(ThrottledError("429", retry_after_s=2)), Requeue)


def test_a_transient_failure_is_retried_in_place_first() -> None:
    step = after(RetryableError("boom", status=503), number=1, backoff=0.25)
    assert step == decide.TryAgain(0.25)


def test_then_through_a_retry_tier_by_trip_count() -> None:
    step = after(RetryableError("boom", status=503), number=2)
    assert isinstance(step, RetryLater) and step.delay_ms == 1000
    again = after(RetryableError("boom", status=503), number=2, retries=5)
    assert isinstance(again, RetryLater) and again.delay_ms == 5000  # the last tier repeats


def test_attempts_are_capped_across_deliveries() -> None:
    step = after(RetryableError("boom", status=502), number=1, attempts=4)
    assert isinstance(step, Failed)
    assert step.failure.code is p.ErrorCode.BACKEND_ERROR
    assert step.failure.extra == {"status": 502}
    assert "after 5 attempts" in step.failure.message


def test_no_retry_when_it_cannot_fit_before_the_deadline() -> None:
    step = after(RetryableError("boom", status=500), number=2, deadline_in_s=0.5)
    assert isinstance(step, Failed) and step.failure.code is p.ErrorCode.BACKEND_ERROR
    in_place = after(RetryableError("boom", status=500), number=1, backoff=2.0,
                     deadline_in_s=0.5)
    assert isinstance(in_place, Failed)


def test_a_call_cut_at_the_deadline_is_a_deadline_failure() -> None:
    step = after(RetryableError("timed out"), deadline_in_s=-0.01)
    assert failed_reason(step) is p.ParkReason.DEADLINE_EXCEEDED


def test_other_4xx_is_terminal_at_once() -> None:
    step = after(TerminalError("forbidden", status=403), number=1)
    assert isinstance(step, Failed) and step.failure.extra == {"status": 403}
    assert step.failure.reason is p.ParkReason.BACKEND_ERROR
    assert step.failure.message.endswith("(after 1 attempt)")


def test_a_request_the_backend_calls_wrong_is_the_clients_with_its_details() -> None:
    """llama.cpp's context-length error, LiteLLM's invalid_request_error: kept, and a client
    error, not a backend failure."""
    error = TerminalError("too long", status=400, detail={
        "type": "invalid_request_error", "code": "context_length_exceeded",
        "param": "messages"})
    step = after(error, number=1)
    assert isinstance(step, Failed)
    assert step.failure.code is p.ErrorCode.INVALID_REQUEST
    assert step.failure.reason is p.ParkReason.INVALID_REQUEST
    assert step.failure.extra == {"status": 400, "param": "messages", "backend": {
        "type": "invalid_request_error", "code": "context_length_exceeded",
        "param": "messages"}}
    retried_out = after(RetryableError("boom", status=500, detail={"code": "oom"}),
                        number=1, attempts=4)
    assert isinstance(retried_out, Failed)
    assert retried_out.failure.code is p.ErrorCode.BACKEND_ERROR
    assert retried_out.failure.extra["backend"] == {"code": "oom"}


def test_a_wrong_backend_url_is_a_backend_error_not_the_clients() -> None:
    """A 404 without an error body (a base url without /v1) is retried like a 5xx and ends
    as backend_error: the runbook must not send the operator to the clients."""
    error = BackendNotFoundError("backend b1 answered HTTP 404: Not Found", status=404)
    assert decide.attempt_kind(delivery(), error) == "retryable"
    assert after(error, number=1, backoff=0.1) == decide.TryAgain(0.1)
    step = after(error, number=1, attempts=4)
    assert isinstance(step, Failed)
    assert step.failure.code is p.ErrorCode.BACKEND_ERROR
    assert step.failure.reason is p.ParkReason.BACKEND_ERROR


def test_without_retry_tiers_a_transient_failure_ends_after_the_in_place_budget() -> None:
    pool = POOL.model_copy(update={"retry_delays_ms": []})
    d = delivery()
    d.attempts = 2
    error = RetryableError("boom", status=500)
    step = decide.after_failure(d, error, "retryable", 2, pool, 0.1)
    assert isinstance(step, Failed)


@pytest.mark.parametrize(("reply_to", "says"), [
    (None, "has no reply_to"),
    ("amq.rabbitmq.reply-to.g1h2AA", "direct reply-to"),
    ("amq.gen-Xa2", "server-named exclusive queue"),
    ("llm.work.chat", "not a Hutch reply queue"),
])
def test_an_unusable_reply_to_says_what_to_use_instead(reply_to: str | None,
                                                       says: str) -> None:
    outcome = decide.admit(delivery(reply_to=reply_to), POOL, max_body_bytes=1000,
                           available=True, reply_queue="llm.reply.<client-id>")
    assert isinstance(outcome, Failed)
    assert outcome.failure.reason is p.ParkReason.NO_REPLY_TO
    assert says in outcome.failure.message
    assert "'llm.reply.<client-id>'" in outcome.failure.message


@pytest.mark.parametrize(("endpoint", "body", "ok"), [
    ("embeddings", {"model": "small", "input": ["a", "b"]}, True),
    ("embeddings", {"model": "small", "input": []}, False),
    ("embeddings", {"model": "small", "messages": [{"role": "user", "content": "x"}]}, False),
    ("completions", {"model": "small", "prompt": "Once"}, True),
    ("completions", {"model": "small", "prompt": "Once", "stream": True}, False),
    ("completions", {"model": "large", "prompt": "Once"}, False),
    ("images", {"model": "small", "prompt": "a cat"}, False),
])
def test_each_endpoint_validates_its_own_body(endpoint: str, body: dict[str, object],
                                              ok: bool) -> None:
    outcome = admit(body=json.dumps(body).encode(), headers={p.H_ENDPOINT: endpoint})
    assert isinstance(outcome, Failed) is not ok, outcome


def test_a_model_rate_limited_here_waits_in_the_covering_tier() -> None:
    assert isinstance(admit(model_wait_s=0.0), ChatRequest)
    waiting = admit(model_wait_s=2.0)  # tiers 1000, 5000: the first that covers 2 s
    assert isinstance(waiting, RetryLater) and waiting.delay_ms == 5000
    assert waiting.reason == "throttled"
    longest = admit(model_wait_s=60.0)
    assert isinstance(longest, RetryLater) and longest.delay_ms == 5000
    late = admit(model_wait_s=2.0, deadline_in_s=3)
    assert failed_reason(late) is p.ParkReason.DEADLINE_EXCEEDED
    throttled = after(ThrottledError("429"), model_wait_s=0.5)
    assert isinstance(throttled, RetryLater) and throttled.delay_ms == 1000
