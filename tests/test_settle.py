"""The settler: each Outcome becomes its publishes, then its ack or nack, and the hooks
hear of it once (no broker: the publisher is a recording fake; what the broker does with
the messages is tested against the real one in test_pipeline, test_failures, ...)."""

from __future__ import annotations

from typing import Any, cast

import aiormq
import pytest

from pipeline import protocol as p
from pipeline.delivery import Delivery
from pipeline.errors import TopologyError
from pipeline.observe.hooks import DeliveryHook, Settlement
from pipeline.outcome import (
    Completed,
    Failed,
    Failure,
    Outcome,
    Requeue,
    RetryLater,
)
from pipeline.settle.publisher import Publisher
from pipeline.settle.settler import Settler
from tests.fakes import NAMES, delivery, settled_of


class RecordingPublisher:
    """Records what would be published; ``missing`` names destinations that return it."""

    def __init__(self, missing: tuple[str, ...] = ()) -> None:
        self.sent: list[tuple[str, str, bytes, aiormq.spec.Basic.Properties]] = []
        self.missing = missing

    async def publish(self, body: bytes, properties: aiormq.spec.Basic.Properties, *,
                      routing_key: str, exchange: str = "") -> bool:
        if routing_key in self.missing or exchange in self.missing:
            return False
        self.sent.append((exchange, routing_key, body, properties))
        return True

    def to(self, routing_key: str) -> list[aiormq.spec.Basic.Properties]:
        return [props for _, key, _, props in self.sent if key == routing_key]


class RecordingHook(DeliveryHook):
    def __init__(self) -> None:
        self.events: list[tuple[Outcome, Settlement]] = []

    def settled(self, delivery: Delivery, outcome: Outcome, settlement: Settlement) -> None:
        self.events.append((outcome, settlement))


def settler(publisher: RecordingPublisher) -> tuple[Settler, RecordingHook]:
    hook = RecordingHook()
    return Settler(cast(Publisher, publisher), NAMES, hook, worker_user="worker"), hook


def headers(props: aiormq.spec.Basic.Properties) -> dict[str, Any]:
    return dict(props.headers or {})


COMPLETION = Completed(b'{"id":"x"}', None, 0.25)
BAD = Failure(p.ParkReason.BACKEND_ERROR, p.ErrorCode.BACKEND_ERROR, "backend said no",
              {"status": 400})


async def test_completed_is_replied_then_acked() -> None:
    publisher = RecordingPublisher()
    s, hook = settler(publisher)
    d = delivery()
    await s.settle(d, COMPLETION)
    [reply] = publisher.to("llm.reply.app")
    assert headers(reply)[p.H_OUTCOME] == "ok" and headers(reply)[p.H_BACKEND_MS] == 250
    assert reply.correlation_id == "req-1" and reply.priority == 3
    assert settled_of(d) == ["ack"]
    assert hook.events == [(COMPLETION, Settlement("ok"))]


async def test_completed_without_a_reply_queue_is_parked_undeliverable() -> None:
    publisher = RecordingPublisher(missing=("llm.reply.app",))
    s, hook = settler(publisher)
    d = delivery()
    await s.settle(d, COMPLETION)
    [parked] = publisher.to(NAMES.parked_queue)
    assert headers(parked)[p.H_REASON] == "no_reply_to"
    assert settled_of(d) == ["ack"]
    assert hook.events[0][1].label == "undeliverable"


async def test_failed_is_answered_then_parked_then_acked() -> None:
    publisher = RecordingPublisher()
    s, hook = settler(publisher)
    d = delivery(user_id="app")
    await s.settle(d, Failed(BAD))
    [reply] = publisher.to("llm.reply.app")
    assert headers(reply)[p.H_ERROR_CODE] == "backend_error"
    [parked] = publisher.to(NAMES.parked_queue)
    parked_headers = headers(parked)
    assert parked_headers[p.H_REASON] == "backend_error"
    assert parked_headers[p.H_USER] == "app"
    assert parked_headers[p.H_ORIGINAL_ROUTING_KEY] == "small"
    assert parked_headers[p.H_FIRST_FAILED_AT] == parked_headers[p.H_PARKED_AT]
    assert [event[0] for event in publisher.sent] == ["", ""]  # reply first, then park
    assert settled_of(d) == ["ack"]
    assert hook.events[0][1] == Settlement("backend_error", p.ParkReason.BACKEND_ERROR,
                                           "backend said no")


async def test_a_forged_reply_to_is_never_written_to() -> None:
    publisher = RecordingPublisher()
    s, _ = settler(publisher)
    d = delivery(user_id="app", reply_to="llm.reply.other")
    await s.settle(d, Failed(BAD))
    assert publisher.to("llm.reply.other") == []
    [parked] = publisher.to(NAMES.parked_queue)
    assert headers(parked)[p.H_REASON] == "forged_reply_to"
    assert "had also failed: backend said no" in headers(parked)[p.H_ERROR_MESSAGE]


async def test_a_missing_reply_queue_is_noted_on_the_parked_copy() -> None:
    publisher = RecordingPublisher(missing=("llm.reply.app",))
    s, _ = settler(publisher)
    await s.settle(delivery(), Failed(BAD))
    [parked] = publisher.to(NAMES.parked_queue)
    assert "reply queue 'llm.reply.app' does not exist" in headers(parked)[p.H_ERROR_MESSAGE]


async def test_retry_later_goes_through_the_tier_with_its_counters() -> None:
    publisher = RecordingPublisher()
    s, hook = settler(publisher)
    d = delivery(user_id="worker", headers={p.H_USER: "app"}, deadline_in_s=60, retries=1)
    d.attempts = 3
    outcome = RetryLater(5000, "boom", "http_503")
    await s.settle(d, outcome)
    [(exchange, key, _, props)] = publisher.sent
    assert (exchange, key) == (NAMES.retry_exchange, "small")
    sent = headers(props)
    assert sent[p.H_ATTEMPTS] == 3 and sent[p.H_RETRIES] == 2
    assert sent[p.H_RETRY_TIER] == "5000" and sent[p.H_DEADLINE] == d.deadline_ms
    assert sent[p.H_USER] == "app" and props.user_id == "worker"  # the worker vouches
    assert settled_of(d) == ["ack"]
    assert hook.events == [(outcome, Settlement())]


async def test_a_client_set_identity_header_is_dropped_on_retry() -> None:
    publisher = RecordingPublisher()
    s, _ = settler(publisher)
    await s.settle(delivery(headers={p.H_USER: "admin"}), RetryLater(1000, "x", "other"))
    [(_, _, _, props)] = publisher.sent
    assert p.H_USER not in headers(props) and props.user_id is None


async def test_requeue_is_a_nack_with_requeue_and_publishes_nothing() -> None:
    publisher = RecordingPublisher()
    s, hook = settler(publisher)
    d = delivery()
    await s.settle(d, Requeue("throttled"))
    assert publisher.sent == [] and settled_of(d) == ["nack(requeue=True)"]
    assert len(hook.events) == 1


@pytest.mark.parametrize("outcome", [Failed(BAD), RetryLater(1000, "x", "other")])
async def test_missing_topology_is_a_topology_error_not_an_ack(outcome: Outcome) -> None:
    s, hook = settler(RecordingPublisher(missing=(NAMES.parked_queue, NAMES.retry_exchange)))
    d = delivery()
    with pytest.raises(TopologyError, match="hutch topology apply"):
        await s.settle(d, outcome)
    assert settled_of(d) == [] and hook.events == []


def test_abandoned_tells_the_hooks_once() -> None:
    s, hook = settler(RecordingPublisher())
    s.abandoned(delivery(), ConnectionError("gone"))
    [(outcome, settlement)] = hook.events
    assert "gone" in getattr(outcome, "error", "") and settlement == Settlement()
