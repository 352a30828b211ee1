"""The adaptive concurrency limit (pipeline.capacity.limit), on a fake clock.

Unit rules first (rise only when the limit held the backend back, fall on refusals, on a
server's own queue, on latency; stale metrics are unknown; errors are never fast), then a
simulated server with room for 12 that queues the rest inside itself: the limit must find
it from a cold start, with metrics and with latency alone, and follow a capacity halving.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
from dataclasses import dataclass

import pytest

from pipeline.backends.breaker import BackendGate, BreakerPolicy
from pipeline.capacity.limit import AdaptiveLimit, FixedLimit, LimitTuning
from pipeline.worker.health import BackendHealthReporter

#: TCP's doubling, for the tests whose arithmetic is easier with it.
DOUBLING = LimitTuning(slow_start_factor=2.0)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@dataclass(frozen=True)
class Snap:
    running: int | None = None
    waiting: int | None = None
    kv_usage: float | None = None


def window(limit: AdaptiveLimit, clock: Clock, *, latency: float = 0.1,
           in_flight: int | None = None, n: int | None = None) -> None:
    """One full window of successes at ``in_flight`` (default: at the limit)."""
    count = n if n is not None else max(3, limit.current // 2)
    clock.now += 0.3
    for _ in range(count):
        limit.completed(latency, None, limit.current if in_flight is None else in_flight)


def test_a_cold_start_grows_by_half_while_the_limit_holds_the_backend_back() -> None:
    clock = Clock()
    limit = AdaptiveLimit(1, 64, clock=clock)
    assert limit.current == 4  # min(4, ceiling): never the ceiling
    seen = []
    for _ in range(8):
        window(limit, clock)
        seen.append(limit.current)
    assert seen == [6, 9, 14, 21, 32, 48, 64, 64]


def test_no_rise_without_demand() -> None:
    clock = Clock()
    limit = AdaptiveLimit(1, 64, clock=clock)
    for _ in range(5):
        window(limit, clock, in_flight=2)  # only 2 of 4 ever used
    assert limit.current == 4


def test_a_refusal_falls_once_per_window_and_ends_the_slow_start() -> None:
    clock = Clock()
    limit = AdaptiveLimit(1, 64, 16, clock=clock)
    assert limit.refused(16)
    assert limit.current == 11  # floor(16 * 0.7)
    assert not limit.refused(16)  # the same window: once
    assert limit.current == 11
    assert limit.state == "refused"
    # After the hold, it probes upward by one per window, not by half again.
    for _ in range(limit.tuning.hold_windows + 2):  # the refused window, the hold, one
        window(limit, clock)
    assert limit.current == 12


def test_the_servers_own_queue_makes_the_limit_fall_at_once() -> None:
    clock = Clock()
    limit = AdaptiveLimit(1, 64, 16, clock=clock)
    # 16 of Hutch's calls there, 4 of them waiting: the server runs 12: that is the limit.
    assert limit.saturation(Snap(running=12, waiting=4, kv_usage=0.5), in_flight=16)
    assert limit.current == 12
    assert limit.state == "backend_queueing"
    assert not limit.saturation(Snap(running=12, waiting=4), in_flight=16)  # once a window
    window(limit, clock)
    assert limit.current == 12
    # A queue of other clients' (more waiting than Hutch has there): one less at least.
    clock.now += limit.tuning.max_window_s
    assert limit.saturation(Snap(running=12, waiting=30), in_flight=12)
    assert limit.current == 1  # the limit minus what waits, floored


def probe_gaps(room: int, windows: int, limit: AdaptiveLimit, clock: Clock) -> list[int]:
    """Windows between the probes above ``room`` of a server that never grows: each probe
    is seen queueing at the next scrape."""
    probes: list[int] = []
    for n in range(windows):
        limit.saturation(Snap(running=min(room, limit.current),
                              waiting=max(0, limit.current - room)), limit.current)
        window(limit, clock, in_flight=limit.current)
        if limit.current > room:
            probes.append(n)
    return [b - a for a, b in itertools.pairwise(probes)]


def test_failed_probes_double_the_hold_and_one_that_holds_ends_the_doubling() -> None:
    clock = Clock()
    tuning = LimitTuning()
    limit = AdaptiveLimit(1, 64, 12, clock=clock, tuning=tuning)
    limit.saturation(Snap(running=12, waiting=1), in_flight=13)  # found the room: 12
    gaps = probe_gaps(12, 200, limit, clock)
    hold = tuning.hold_windows
    # Each probe queued one request: the holds after them are 16, then 32 windows.
    assert gaps[:3] == [hold * 2 + 2, hold * 4 + 2, hold * 4 + 2], gaps
    # The room grew to 16: probes hold up to it, and the doubling starts again from one.
    gaps = probe_gaps(16, 120, limit, clock)
    assert limit.current in (16, 17)
    assert gaps[:2] == [hold * 2 + 2, hold * 4 + 2], gaps


def test_a_rise_waits_for_metrics_that_show_the_last_change() -> None:
    clock = Clock()
    limit = AdaptiveLimit(1, 64, 8, clock=clock, tuning=DOUBLING)
    limit.saturation(Snap(running=8, waiting=0, kv_usage=0.2), in_flight=8)
    window(limit, clock)
    assert limit.current == 16  # room, shown after the last change: double
    window(limit, clock)  # no scrape since: it does not know what 16 did
    assert limit.current == 16
    limit.saturation(Snap(running=16, waiting=0, kv_usage=0.4), in_flight=16)
    window(limit, clock)
    assert limit.current == 32


def test_a_full_kv_cache_stops_the_rise_and_room_lets_it_rise_despite_latency() -> None:
    clock = Clock()
    limit = AdaptiveLimit(1, 64, 8, clock=clock, tuning=DOUBLING)
    window(limit, clock, latency=0.1)
    assert limit.current == 16
    limit.saturation(Snap(running=16, waiting=0, kv_usage=0.95))
    window(limit, clock)
    assert limit.current == 16
    assert limit.state == "backend_full"
    # Metrics are trusted over latency: room in the cache, no queue: rise, though calls
    # got 3x slower (a bigger batch).
    limit.saturation(Snap(running=16, waiting=0, kv_usage=0.5))
    window(limit, clock, latency=0.3)
    assert limit.current == 17


def test_stale_metrics_are_unknown_never_free() -> None:
    clock = Clock()
    limit = AdaptiveLimit(1, 64, 16, clock=clock)
    window(limit, clock, latency=0.1)  # the best window
    before = limit.current
    limit.saturation(Snap(running=1, waiting=0, kv_usage=0.01))  # "idle"...
    clock.now += limit.tuning.stale_s + 1  # ...long ago
    window(limit, clock, latency=0.5)  # latency says saturated: it decides
    assert limit.current < before
    assert limit.state == "latency_rose"


def test_latency_beyond_tolerance_falls_in_proportion_bounded_by_the_backoff() -> None:
    clock = Clock()
    limit = AdaptiveLimit(1, 100, 40, clock=clock, tuning=DOUBLING)
    window(limit, clock, latency=0.1)
    assert limit.current == 80
    window(limit, clock, latency=0.2)  # 2x the best, tolerance 1.5: x0.75
    assert limit.current == 60
    window(limit, clock, latency=1.0)  # 10x: bounded by the backoff, x0.7
    assert limit.current == 42


def test_failures_are_never_latency_samples() -> None:
    clock = Clock()
    limit = AdaptiveLimit(1, 64, clock=clock)
    # A 1 ms error storm through the health reporter: no completions, no rise.
    gate = BackendGate(BreakerPolicy(failure_threshold=1000, cooldown_s=1))
    health = BackendHealthReporter("b", 64, gate, _Gauge(), limit=limit,
                                   in_flight=lambda: limit.current)
    for _ in range(200):
        clock.now += 0.01
        health.failure()
    assert limit.current == 4


def test_floor_ceiling_and_reset() -> None:
    clock = Clock()
    limit = AdaptiveLimit(3, 10, 5, clock=clock)
    for _ in range(10):
        limit.refused(5)
        clock.now += 1
        window(limit, clock, latency=10.0)
    assert limit.current == 3
    limit.reset()
    assert limit.current == 5 and limit.state == "start"
    for _ in range(40):
        window(limit, clock)
    assert limit.current == 10
    with pytest.raises(ValueError, match="floor"):
        AdaptiveLimit(5, 4)


def test_the_fixed_limit_ignores_every_signal() -> None:
    limit = FixedLimit(8)
    assert not limit.completed(9.0, 1, 8)
    assert not limit.refused(8)
    assert not limit.saturation(Snap(waiting=100))
    assert limit.current == limit.ceiling == 8


class _Gauge:
    def set(self, value: float) -> None:
        self.value = value


async def test_the_health_reports_the_limit_and_wakes_the_controller() -> None:
    clock = Clock()
    limit = AdaptiveLimit(1, 32, 4, clock=clock, tuning=DOUBLING)
    gate = BackendGate(BreakerPolicy(failure_threshold=3, cooldown_s=5))
    health = BackendHealthReporter("b", 32, gate, _Gauge(), limit=limit,
                                   in_flight=lambda: limit.current)
    assert health.adaptive and health.max_concurrency == 32
    assert health.allowed() == 4
    clock.now += 0.3
    for _ in range(3):
        health.success(0.1, 10)
    assert health.allowed() == 8 and health.changed.is_set()
    health.changed.clear()
    health.throttled(None)  # a 429: the limit falls, and the gate throttles
    assert limit.current == 5 and health.changed.is_set()
    assert "limit refused" in health.describe()
    health.changed.clear()
    health.saturation(Snap(running=4, waiting=2))  # the same window as the 429: no fall
    assert limit.current == 5 and not health.changed.is_set()
    clock.now += limit.tuning.max_window_s  # a stalled backend: again after a while
    health.saturation(Snap(running=4, waiting=2))  # 5 there, 2 waiting: it runs 3
    assert limit.current == 3 and health.changed.is_set()
    await asyncio.sleep(0)


# -- a simulated server -------------------------------------------------------------------


class Server:
    """Room for ``room`` requests of ``service_s`` each; the rest queue inside, FIFO."""

    def __init__(self, room: int, service_s: float = 0.1) -> None:
        self.room = room
        self.service_s = service_s
        self.running: list[tuple[float, float]] = []  # (arrived, ends)
        self.waiting: collections.deque[float] = collections.deque()

    def submit(self, now: float) -> None:
        self.waiting.append(now)
        self._start(now)

    def _start(self, now: float) -> None:
        while self.waiting and len(self.running) < self.room:
            self.running.append((self.waiting.popleft(), now + self.service_s))

    def finish(self, now: float) -> list[float]:
        """Latencies of the requests done by ``now``."""
        done = [now - arrived for arrived, ends in self.running if ends <= now]
        self.running = [r for r in self.running if r[1] > now]
        self._start(now)
        return done

    def snapshot(self) -> Snap:
        return Snap(running=len(self.running), waiting=len(self.waiting),
                    kv_usage=len(self.running) / max(1, self.room) * 0.85)


def simulate(server: Server, limit: AdaptiveLimit, clock: Clock, seconds: float, *,
             metrics: bool, halve_at: float | None = None) -> list[int]:
    """Always more demand than the limit; returns the limit sampled every 100 ms."""
    step = 0.01
    samples: list[int] = []
    in_flight = 0
    ticks = int(seconds / step)
    for tick in range(ticks):
        clock.now += step
        if halve_at is not None and abs(tick * step - halve_at) < step / 2:
            server.room //= 2
        for latency in server.finish(clock.now):
            limit.completed(latency, None, in_flight)
            in_flight -= 1
        while in_flight < limit.current:
            server.submit(clock.now)
            in_flight += 1
        if metrics and tick % 50 == 0:  # a scrape every 0.5 s
            limit.saturation(server.snapshot(), in_flight)
        if tick % 10 == 0:
            samples.append(limit.current)
    return samples


def test_with_metrics_the_limit_finds_the_servers_room_from_a_cold_start() -> None:
    clock = Clock()
    limit = AdaptiveLimit(1, 64, clock=clock, tuning=LimitTuning())
    samples = simulate(Server(12), limit, clock, 30.0, metrics=True)
    settled = samples[-100:]  # the last 10 s
    assert min(settled) >= 11 and max(settled) <= 14, settled


def test_with_latency_alone_the_limit_stays_near_the_servers_room() -> None:
    clock = Clock()
    limit = AdaptiveLimit(1, 64, clock=clock)
    samples = simulate(Server(12), limit, clock, 30.0, metrics=False)
    settled = samples[-100:]
    # Latency can only see a queue once it exists: tolerance 1.5 allows up to ~18.
    assert min(settled) >= 8 and max(settled) <= 19, settled
    assert sum(settled) / len(settled) >= 10


def test_the_limit_follows_a_capacity_halving() -> None:
    clock = Clock()
    limit = AdaptiveLimit(1, 64, clock=clock)
    server = Server(16)
    samples = simulate(server, limit, clock, 40.0, metrics=True, halve_at=20.0)
    before = samples[150:200]  # 15-20 s
    after = samples[-100:]  # the last 10 s, room 8
    assert min(before) >= 14 and max(before) <= 18, before
    assert min(after) >= 7 and max(after) <= 10, after


def test_metrics_that_say_idle_while_the_backend_refuses_do_not_hold_the_limit_up() -> None:
    """A lying backend: its gauges say idle, it answers 429/503. Refusals win: the limit
    falls on each window's refusal and never climbs back above where it started."""
    clock = Clock()
    limit = AdaptiveLimit(1, 64, 16, clock=clock)
    for _ in range(30):
        limit.saturation(Snap(running=0, waiting=0, kv_usage=0.0))
        limit.refused(limit.current)
        window(limit, clock)
    assert limit.current == 1
    assert limit.state == "refused"


def test_a_new_ceiling_applies_at_once() -> None:
    clock = Clock()
    limit = AdaptiveLimit(2, 64, 32, clock=clock)
    limit.set_ceiling(8)  # a reload lowered the cap
    assert limit.current == 8 and limit.ceiling == 8
    limit.set_ceiling(1)
    assert limit.current == 1 and limit.floor == 1
    limit.reset()
    assert limit.current == 1  # the start came down with it
    fixed = FixedLimit(4)
    fixed.set_ceiling(6)
    assert fixed.current == 6
    gate = BackendGate(BreakerPolicy(failure_threshold=3, cooldown_s=5))
    health = BackendHealthReporter("b", 4, gate, _Gauge())
    health.max_concurrency = 2
    assert health.allowed() == 2 and health.changed.is_set()
