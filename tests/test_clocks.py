"""Clocks (issue 21, item 5): a client whose clock is 10 s off the workers'.

Deadlines used to travel only as epoch milliseconds of the client's clock. A relative
``x-hutch-timeout-ms`` now wins: the worker turns it into a deadline on its own clock at
the first receipt, and a republish carries the absolute deadline that worker computed. The
skew a worker sees (its clock minus ``x-hutch-sent-at``) is exported.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Mapping
from typing import Any

import aio_pika
import pytest

from pipeline import protocol as p
from pipeline.broker.topology import apply_topology
from pipeline.client.client import HutchClient
from pipeline.errors import DeadlineExceededError
from pipeline.observe.clocks import SkewWindow
from pipeline.observe.metrics import Metrics
from pipeline.observe.metrics_hook import MetricsHook
from pipeline.ops.dlq import replay_headers
from pipeline.outcome import RetryLater
from pipeline.testing.mock import MockBackend, MockConfig
from tests.conftest import SettingsFactory, running_worker
from tests.fakes import delivery
from tests.test_settle import RecordingPublisher, headers, settler

USER = [{"role": "user", "content": "hi"}]
NOW = 1_800_000_000_000


# -- the header --------------------------------------------------------------------------


@pytest.mark.parametrize(("value", "expected"), [
    (5000, 5000), ("5000", 5000), (b"250", 250), (5000.9, 5000), (1, 1),
    (0, None), (-5, None), ("soon", None), (True, None), (float("nan"), None),
    (31 * 24 * 3600 * 1000, None), ([5000], None),
])
def test_the_timeout_header_is_a_bounded_whole_number_of_ms(value: Any,
                                                            expected: int | None) -> None:
    assert p.timeout_ms({p.H_TIMEOUT_MS: value}) == expected


def test_the_relative_timeout_wins_over_the_absolute_deadline() -> None:
    both = {p.H_TIMEOUT_MS: 5000, p.H_DEADLINE: NOW - 10_000}  # a clock 15 s behind
    assert p.deadline_ms(both, 5.0, NOW / 1000, received_ms=NOW) == NOW + 5000
    junk = {p.H_TIMEOUT_MS: "soon", p.H_DEADLINE: NOW + 7000}  # junk: the deadline counts
    assert p.deadline_ms(junk, None, None, received_ms=NOW) == NOW + 7000
    assert p.deadline_ms({}, 5.0, NOW / 1000, received_ms=NOW + 1) == NOW + 5000
    assert p.deadline_ms({}, None, None) is None


def test_the_worker_counts_the_timeout_from_its_own_receipt() -> None:
    before = p.now_ms()
    d = delivery(headers={p.H_TIMEOUT_MS: 30_000, p.H_DEADLINE: before - 60_000})
    assert d.deadline_ms is not None and before + 30_000 <= d.deadline_ms <= p.now_ms() + 30_000
    assert not d.deadline_passed()


async def test_a_republish_carries_the_workers_deadline_not_the_relative_timeout() -> None:
    publisher = RecordingPublisher()
    s, _ = settler(publisher)
    d = delivery(headers={p.H_TIMEOUT_MS: 30_000, p.H_SENT_AT: NOW})
    await s.settle(d, RetryLater(1000, "boom", "http_503"))
    [(_, _, _, props)] = publisher.sent
    sent = headers(props)
    assert p.H_TIMEOUT_MS not in sent and sent[p.H_DEADLINE] == d.deadline_ms
    assert sent[p.H_SENT_AT] == NOW  # the send time stays the client's


def test_a_replayed_request_has_no_deadline_left() -> None:
    replayed = replay_headers({p.H_TIMEOUT_MS: 5000, p.H_DEADLINE: NOW}, now_ms=NOW + 1)
    assert p.H_TIMEOUT_MS not in replayed and p.H_DEADLINE not in replayed


def test_the_client_sends_both_the_timeout_and_the_deadline() -> None:
    client = HutchClient("amqp://guest:guest@127.0.0.1:9/")
    message = client._request_message(b"{}", "c1", 0, 2.5)
    sent = dict(message.headers)
    assert sent[p.H_TIMEOUT_MS] == 2500
    assert sent[p.H_DEADLINE] - sent[p.H_SENT_AT] == 2500


# -- the skew metric -----------------------------------------------------------------------


def test_the_skew_window_keeps_the_smallest_difference_of_the_window() -> None:
    window = SkewWindow(window_s=60)
    assert math.isnan(window.value())
    for seconds in (3.0, -9.8, 12.0, -9.9, 0.4):
        window.observe(seconds)
    assert window.value() == -9.9
    short = SkewWindow(window_s=0.0)
    short.observe(-10.0)
    time.sleep(0.01)
    assert math.isnan(short.value())  # nothing seen within the window


def test_first_deliveries_feed_the_skew_gauge_retries_do_not() -> None:
    metrics = Metrics()
    hook = MetricsHook(metrics)
    hook.received(delivery(headers={p.H_SENT_AT: p.now_ms() + 10_000}))  # 10 s ahead
    hook.received(delivery(headers={p.H_SENT_AT: p.now_ms() - 600_000}, retries=1))
    value = metrics.registry.get_sample_value("hutch_clock_skew_seconds")
    assert value is not None and -10.5 < value < -9


# -- a skewed client against a real worker --------------------------------------------------


class SkewedClient(HutchClient):
    """A client whose clock is ``skew_s`` off; ``legacy``: without x-hutch-timeout-ms (a
    client of before the header, or a third-party one)."""

    skew_s = 0.0
    legacy = False

    def _request_message(self, payload: bytes, correlation_id: str, priority: int,
                         timeout_s: float, extra: Mapping[str, Any] | None = None
                         ) -> aio_pika.Message:
        message = super()._request_message(payload, correlation_id, priority, timeout_s,
                                           extra)
        sent = dict(message.headers)
        shift = int(self.skew_s * 1000)
        sent[p.H_SENT_AT] += shift
        sent[p.H_DEADLINE] += shift
        if self.legacy:
            del sent[p.H_TIMEOUT_MS]
        message.headers = sent
        return message


async def test_a_client_10s_behind(make_settings: SettingsFactory) -> None:
    """Its deadlines look 10 s past: with the absolute deadline alone, a 5 s request is
    answered deadline_exceeded at once, never served; with the relative timeout it is."""
    async with MockBackend(MockConfig(latency_ms=5, capacity=4)) as mock:
        settings = make_settings([("b1", mock.base_url, 4)])
        await apply_topology(settings)
        async with running_worker(settings) as worker, \
                SkewedClient.from_settings(settings) as client:
            assert isinstance(client, SkewedClient)
            client.skew_s = -10.0
            client.legacy = True
            with pytest.raises(DeadlineExceededError) as failed:
                await client.chat(model="mock-small", messages=USER, timeout=5)
            assert mock.stats()["served"] == 0
            client.legacy = False
            completion = await client.chat(model="mock-small", messages=USER, timeout=5)
            assert completion.choices[0].message.content == "mock reply to: hi"
            skew = worker.metrics.registry.get_sample_value("hutch_clock_skew_seconds")
    assert "deadline" in failed.value.message
    assert skew is not None and skew > 9  # the worker's clock minus the client's
    print(f"\nclient 10 s behind: legacy -> {failed.value.code} ({failed.value.message}); "
          f"with x-hutch-timeout-ms -> ok; hutch_clock_skew_seconds {skew:.2f}")


async def test_a_client_10s_ahead(make_settings: SettingsFactory) -> None:
    """Its deadlines look 10 s later: with the absolute deadline alone the worker serves a
    1 s request at a 3 s backend after the client gave up (for nobody); with the relative
    timeout the worker ends it at its deadline instead."""
    async with MockBackend(MockConfig(latency_ms=3000, capacity=4)) as mock:
        settings = make_settings([("b1", mock.base_url, 4)],
                                 pool={"attempts_per_delivery": 1})
        await apply_topology(settings)
        async with running_worker(settings) as worker, \
                SkewedClient.from_settings(settings) as client:
            assert isinstance(client, SkewedClient)
            sample = worker.metrics.registry.get_sample_value

            def answered(outcome: str) -> bool:
                return sample("hutch_requests_total", {"pool": "chat", "outcome": outcome}) == 1

            client.skew_s = 10.0
            client.legacy = True
            with pytest.raises(DeadlineExceededError):
                await client.chat(model="mock-small", messages=USER, timeout=1)
            await wait_until(lambda: answered("ok"))  # served after the client gave up
            client.legacy = False
            with pytest.raises(DeadlineExceededError):
                await client.chat(model="mock-small", messages=USER, timeout=1)
            await wait_until(lambda: answered("deadline_exceeded"))
            served = mock.stats()["served"]
            skew = sample("hutch_clock_skew_seconds")
    assert served == 1  # the second request was ended at its deadline, not served
    assert skew is not None and skew < -9
    print(f"\nclient 10 s ahead: legacy -> the backend served a 1 s request for nobody "
          f"(3 s later); with x-hutch-timeout-ms -> deadline_exceeded at the worker; "
          f"hutch_clock_skew_seconds {skew:.2f}")


async def wait_until(predicate: Any, timeout: float = 30.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.05)
