"""The delivery hooks: the seam where a new concern attaches without touching dispatch."""

from __future__ import annotations

import contextlib

import pytest

from pipeline.broker.topology import apply_topology
from pipeline.client.client import HutchClient
from pipeline.delivery import Delivery
from pipeline.errors import BackendCallError, InvalidRequestError
from pipeline.observe.hooks import DeliveryHook, Hooks, Settlement
from pipeline.outcome import Completed, Failed, Outcome
from pipeline.testing.mock import MockBackend
from tests.conftest import SettingsFactory, running_worker, wait_for
from tests.fakes import delivery


class Recorder(DeliveryHook):
    """Records every event by name, as a tracing or metering hook would see them."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str | None]] = []
        self.outcomes: dict[str | None, tuple[Outcome, Settlement]] = {}

    def received(self, delivery: Delivery) -> None:
        self.events.append(("received", delivery.correlation_id))

    def call_started(self, delivery: Delivery) -> None:
        self.events.append(("call_started", delivery.correlation_id))

    def call_ended(self, delivery: Delivery, kind: str, elapsed_s: float,
                   error: BackendCallError | None) -> None:
        self.events.append((f"call_ended:{kind}", delivery.correlation_id))

    def settled(self, delivery: Delivery, outcome: Outcome, settlement: Settlement) -> None:
        self.events.append(("settled", delivery.correlation_id))
        self.outcomes[delivery.correlation_id] = (outcome, settlement)


class Broken(DeliveryHook):
    def received(self, delivery: Delivery) -> None:
        raise RuntimeError("a hook with a bug")


def test_a_failing_hook_does_not_stop_the_others() -> None:
    recorder = Recorder()
    Hooks(Broken(), recorder).received(delivery())
    assert recorder.events == [("received", "req-1")]


async def test_a_worker_hook_sees_each_delivery_from_receipt_to_settlement(
        make_settings: SettingsFactory, mock: MockBackend) -> None:
    settings = make_settings([("b1", mock.base_url, 2)])
    await apply_topology(settings)
    recorder = Recorder()
    async with contextlib.AsyncExitStack() as stack:
        await stack.enter_async_context(running_worker(settings, hooks=[recorder]))
        client = await stack.enter_async_context(HutchClient.from_settings(settings))
        good = await client.submit({"model": "mock-small", "messages": [
            {"role": "user", "content": "hi"}]}, model="mock-small")
        ok = await client.result(good)
        bad = await client.submit({"model": "mock-small", "messages": []}, model="mock-small")
        with pytest.raises(InvalidRequestError):
            await client.result(bad)

        async def both_settled() -> bool:
            return len(recorder.outcomes) == 2

        # A reply can reach the client before the worker's ack (and its hooks) ran.
        await wait_for(both_settled)
    assert ok.completion.choices

    def of(request: str) -> list[str]:
        return [event for event, cid in recorder.events if cid == request]

    assert of(good) == ["received", "call_started", "call_ended:ok", "settled"]
    assert of(bad) == ["received", "settled"]  # refused before any backend call
    (first, done), (second, failed) = recorder.outcomes[good], recorder.outcomes[bad]
    assert isinstance(first, Completed) and done == Settlement("ok")
    assert isinstance(second, Failed) and failed.label == "invalid_request"
