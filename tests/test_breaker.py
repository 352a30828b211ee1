"""BackendGate: circuit breaker and 429 throttling, driven by a fake clock."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest

from pipeline.backends.breaker import BackendGate, BreakerPolicy, LatencyFloor, State


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> Clock:
    return Clock()


POLICY = BreakerPolicy(failure_threshold=3, cooldown_s=10.0, max_cooldown_s=35.0,
                      throttle_backoff_s=1.0)


def make_gate(clock: Clock, throttle_backoff_s: float = 1.0) -> BackendGate:
    return BackendGate(replace(POLICY, throttle_backoff_s=throttle_backoff_s), clock=clock)


def state(gate: BackendGate) -> State:
    """Read through a call, so mypy does not narrow the property between two reads."""
    return gate.state


def fail(gate: BackendGate, times: int) -> None:
    for _ in range(times):
        gate.failure()


def test_starts_closed_with_full_capacity(clock: Clock) -> None:
    gate = make_gate(clock)
    assert state(gate) is State.CLOSED
    assert (gate.capacity(8), gate.available_in(), gate.state_code) == (8, 0.0, 0)


def test_opens_at_threshold_then_half_opens_after_cooldown(clock: Clock) -> None:
    gate = make_gate(clock)
    fail(gate, 2)
    assert state(gate) is State.CLOSED and gate.consecutive_failures == 2
    gate.failure()
    assert state(gate) is State.OPEN
    assert (gate.capacity(8), gate.available_in(), gate.state_code) == (0, 10.0, 2)
    clock.advance(9.9)
    assert state(gate) is State.OPEN
    clock.advance(0.1)
    assert state(gate) is State.HALF_OPEN
    assert (gate.capacity(8), gate.available_in(), gate.state_code) == (1, 0.0, 1)


def test_success_in_closed_resets_the_count(clock: Clock) -> None:
    gate = make_gate(clock)
    fail(gate, 2)
    gate.success()
    assert gate.consecutive_failures == 0
    fail(gate, 2)
    assert state(gate) is State.CLOSED


def test_probe_success_closes(clock: Clock) -> None:
    gate = make_gate(clock)
    fail(gate, 3)
    clock.advance(10)
    gate.success()
    assert state(gate) is State.CLOSED
    assert gate.capacity(8) == 8 and gate.consecutive_failures == 0


def test_probe_failure_reopens_with_doubled_capped_cooldown(clock: Clock) -> None:
    gate = make_gate(clock)
    fail(gate, 3)
    waits: list[float] = []
    for _ in range(4):
        clock.advance(gate.available_in())
        assert state(gate) is State.HALF_OPEN
        gate.failure()  # the probe fails: one failure is enough
        assert state(gate) is State.OPEN
        waits.append(gate.available_in())
    assert waits == [20.0, 35.0, 35.0, 35.0]


def test_cooldown_restarts_from_base_after_closing(clock: Clock) -> None:
    gate = make_gate(clock)
    fail(gate, 3)
    clock.advance(10)
    gate.failure()  # re-open for 20 s
    clock.advance(20)
    gate.success()
    fail(gate, 3)
    assert gate.available_in() == 10.0


def test_stragglers_do_not_undo_an_open_circuit(clock: Clock) -> None:
    gate = make_gate(clock)
    fail(gate, 3)
    clock.advance(4)
    gate.success()  # started before the circuit opened
    assert state(gate) is State.OPEN
    gate.failure()
    gate.failure()
    assert gate.available_in() == 6.0  # cooldown not extended
    clock.advance(6)
    assert state(gate) is State.HALF_OPEN


def test_throttle_with_retry_after(clock: Clock) -> None:
    gate = make_gate(clock)
    gate.throttled(7.5)
    assert state(gate) is State.THROTTLED
    assert (gate.capacity(8), gate.available_in(), gate.state_code) == (0, 7.5, 3)
    clock.advance(7.5)
    assert state(gate) is State.CLOSED and gate.capacity(8) == 8


def test_throttle_without_retry_after_doubles_per_episode_and_caps(clock: Clock) -> None:
    gate = make_gate(clock, throttle_backoff_s=4.0)
    waits: list[float] = []
    for _ in range(5):
        gate.throttled()
        waits.append(gate.available_in())
        clock.advance(gate.available_in())
    assert waits == [4.0, 8.0, 16.0, 32.0, 35.0]


@pytest.mark.parametrize("bad", [-1.0, math.nan, math.inf])
def test_invalid_retry_after_falls_back_to_backoff(clock: Clock, bad: float) -> None:
    gate = make_gate(clock)
    gate.throttled(bad)
    assert gate.available_in() == 1.0


def test_429s_of_one_burst_extend_but_do_not_double(clock: Clock) -> None:
    gate = make_gate(clock)
    gate.throttled()  # 1 s
    gate.throttled()  # same burst: still 1 s
    assert gate.available_in() == 1.0
    gate.throttled(5.0)  # a Retry-After can lengthen the pause
    gate.throttled(2.0)  # but never shorten it
    assert gate.available_in() == 5.0
    clock.advance(5)
    gate.throttled()  # a new episode: the streak is at 2
    assert gate.available_in() == 2.0


def test_the_throttle_streak_decays_with_quiet_time(clock: Clock) -> None:
    """A later 429 after a quiet spell does not pause the backend for the old streak's
    doubled backoff (LiteLLM, seen here: 32 s at once for a 429 minutes later)."""
    gate = make_gate(clock, throttle_backoff_s=1.0)
    for _ in range(5):  # a burst: 1, 2, 4, 8, 16 s
        gate.throttled()
        clock.advance(gate.available_in())
    clock.advance(60)  # two decay periods of quiet: the streak drops from 5 to 3
    gate.throttled()
    assert gate.available_in() == 8.0
    clock.advance(8 + 3600)
    gate.throttled()
    assert gate.available_in() == 1.0  # an hour later: as if the first 429


def test_success_resets_the_throttle_streak(clock: Clock) -> None:
    gate = make_gate(clock)
    gate.throttled()
    clock.advance(1)
    gate.success()
    gate.throttled()
    assert gate.available_in() == 1.0


def test_success_during_throttle_is_a_straggler(clock: Clock) -> None:
    gate = make_gate(clock)
    gate.throttled()
    gate.success()  # started before the 429
    assert state(gate) is State.THROTTLED
    clock.advance(1)
    gate.throttled()
    assert gate.available_in() == 2.0  # the streak survived


def test_throttle_is_not_a_failure(clock: Clock) -> None:
    gate = make_gate(clock)
    fail(gate, 2)
    for _ in range(10):
        gate.throttled()
        clock.advance(gate.available_in())
    assert gate.consecutive_failures == 2
    assert state(gate) is State.CLOSED


def test_throttle_does_not_decide_a_half_open_probe(clock: Clock) -> None:
    gate = make_gate(clock)
    fail(gate, 3)
    clock.advance(10)
    gate.throttled(3.0)
    assert state(gate) is State.THROTTLED and gate.capacity(8) == 0
    clock.advance(3)
    assert state(gate) is State.HALF_OPEN and gate.capacity(8) == 1


def test_open_and_throttled_wait_for_the_later(clock: Clock) -> None:
    gate = make_gate(clock)
    fail(gate, 3)
    gate.throttled(15.0)
    assert state(gate) is State.OPEN and gate.available_in() == 15.0
    clock.advance(10)
    assert state(gate) is State.THROTTLED
    clock.advance(5)
    assert state(gate) is State.HALF_OPEN


def test_default_policy_and_real_clock() -> None:
    gate = BackendGate(BreakerPolicy())
    assert state(gate) is State.CLOSED and gate.capacity(4) == 4


@pytest.mark.parametrize(("field", "value"), [
    ("failure_threshold", 0),
    ("failure_threshold", 2.5),
    ("failure_threshold", True),
    ("cooldown_s", 0.0),
    ("cooldown_s", math.nan),
    ("max_cooldown_s", math.inf),
    ("throttle_backoff_s", -1.0),
    ("max_cooldown_s", 5.0),  # below cooldown_s
])
def test_policy_validation_names_the_field(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=field):
        BreakerPolicy(**{field: value})  # type: ignore[arg-type]


def test_latency_floor_is_the_fastest_of_the_recent_window() -> None:
    floor = LatencyFloor(window=3)
    assert floor.seconds() == 0.0  # nothing known: shed nothing
    for elapsed in (0.5, 0.2, 0.4):
        floor.observe(elapsed)
    assert floor.seconds() == 0.2
    floor.observe(0.6)
    floor.observe(0.7)  # 0.2 has left the window
    assert floor.seconds() == 0.4
