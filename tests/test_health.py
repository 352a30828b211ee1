"""A backend's health reporter: the gate and the pause decide what it may take (no broker)."""

from __future__ import annotations

from pipeline.backends.breaker import BackendGate, BreakerPolicy
from pipeline.dispatch.dispatcher import BackendHealth
from pipeline.worker.health import BackendHealthReporter


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class FakeGauge:
    def __init__(self) -> None:
        self.values: list[float] = []

    def set(self, value: float) -> None:
        self.values.append(value)


def reporter(clock: FakeClock, gauge: FakeGauge, *, failures: int = 2,
             cooldown_s: float = 10.0) -> BackendHealthReporter:
    gate = BackendGate(BreakerPolicy(failure_threshold=failures, cooldown_s=cooldown_s),
                       clock=clock)
    return BackendHealthReporter("b1", 4, gate, gauge)


def test_it_is_the_health_dispatch_reports_to() -> None:
    health: BackendHealth = reporter(FakeClock(), FakeGauge())
    assert health.available()


def test_healthy_backend_takes_its_whole_cap() -> None:
    gauge = FakeGauge()
    health = reporter(FakeClock(), gauge)
    assert gauge.values == [0]  # closed, from the start
    assert health.allowed() == 4 and health.available()
    assert health.reopens_in() is None
    assert not health.changed.is_set()
    health.success(0.25)
    health.success(0.5)
    assert health.fastest_s() == 0.25
    assert not health.changed.is_set()  # no state change, nothing to wake


def test_open_circuit_takes_nothing_then_one_probe() -> None:
    clock, gauge = FakeClock(), FakeGauge()
    health = reporter(clock, gauge, failures=2, cooldown_s=10.0)
    health.failure()
    assert health.allowed() == 4 and not health.changed.is_set()
    health.failure()  # threshold reached: open
    assert health.changed.is_set() and gauge.values[-1] == 2
    assert health.allowed() == 0 and not health.available()
    assert health.reopens_in() == 10.0  # the controller wakes when the cooldown ends
    health.changed.clear()
    clock.now += 10.0  # half-open by the clock alone: nobody signals it
    assert health.allowed() == 1 and health.available()
    assert health.reopens_in() is None
    health.success(0.1)  # the probe succeeded
    assert health.changed.is_set() and gauge.values[-1] == 0
    assert health.allowed() == 4


def test_throttle_pauses_for_retry_after() -> None:
    clock, gauge = FakeClock(), FakeGauge()
    health = reporter(clock, gauge)
    health.throttled(2.5)
    assert health.changed.is_set() and gauge.values[-1] == 3
    assert health.allowed() == 0 and health.reopens_in() == 2.5
    clock.now += 2.5
    assert health.allowed() == 4


def test_pause_and_resume_are_commands() -> None:
    clock = FakeClock()
    health = reporter(clock, FakeGauge())
    assert health.pause() is True
    assert health.paused and health.changed.is_set()
    assert health.allowed() == 0 and not health.available()
    assert health.reopens_in() is None  # only a resume ends a pause
    health.changed.clear()
    assert health.pause() is False and not health.changed.is_set()  # already paused
    # A gate that would reopen by the clock does not reopen a paused backend.
    health.throttled(1.0)
    clock.now += 5
    assert health.allowed() == 0
    assert health.resume() is True and health.changed.is_set()
    assert health.allowed() == 4 and health.available()
    assert health.resume() is False
