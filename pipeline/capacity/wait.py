"""When will a queued request start? A per-request wait estimate, for its status message.

A request a worker cannot start (every backend of its pool saturated) is moved into its
tenant's lane (:mod:`pipeline.scheduling.lanes`); that is where a flood passes through a
worker, and where one that asked for it is told its estimated start. The estimate is what
is ahead of it, in the order the scheduler serves, divided by the pool's service rate:

- **ahead**: every ready request of the lanes of higher bands (bands are strict); the
  requests of its own lane before it (a lane is served in arrival order); from each other
  lane of its band as many as its own lane serves first, at most that lane's depth (the
  fair scheduler gives the band's backlogged lanes about equal turns: tenant weights,
  quota standing and a tenant's own priorities are not modelled); and the requests
  waiting in this worker's admission in its band or higher (they are next).
- **rate**: the pool's recent completions per second (:meth:`ServiceRate.recent_per_second`,
  this worker's divided by the share of the pool's backends it holds); the request starts
  when ``ahead + 1`` more have ended: ``(ahead + 1) / rate`` seconds from now.
- **its lane's pace**: when its lane already holds requests, it starts once they have:
  ``(in lane + 1) / the lane's recent starts per second`` (a :class:`ServiceRate` of the
  lane's starts, measured once it saw :data:`MIN_LANE_STARTS`). The lane's pace is what
  the fair scheduler gives it while the other tenants keep arriving, which the count of
  what is ahead *now* cannot see; the later of the two estimates is taken.
- **tokens ahead**: ``ahead`` x the mean tokens (prompt + completion) of recent requests.

Not counted: requests published after it (a higher band, or a quieter tenant, that will
overtake it) and requests ahead that expire or are cancelled before they start (they take
no backend time): an estimate, not a promise. Lane depths are read from the broker at most
every ``max_age_s`` (:class:`LaneDepths`), corrected in between by what this worker moved
into or took out of each lane. Pure, with injectable clocks: tested with fake ones.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

from pipeline.capacity.backlog import ServiceRate

__all__ = ["MIN_LANE_STARTS", "LaneDepths", "WaitEstimate", "estimate_wait",
           "requests_ahead"]

#: A lane's pace is believed once this many of its requests started in the window.
MIN_LANE_STARTS = 10


@dataclass(frozen=True)
class WaitEstimate:
    """A queued request's estimated start, as of ``estimated_at`` (epoch seconds)."""

    #: Requests that will start before it.
    position: int
    #: Their tokens (prompt + completion), None until the pool served one with usage.
    tokens_ahead: float | None
    #: Seconds from ``estimated_at`` to its start, None while the pool's rate is unknown
    #: (nothing completed recently).
    start_in_s: float | None
    estimated_at: float

    @property
    def start_at_ms(self) -> int | None:
        """The estimated start, epoch milliseconds (the worker's clock)."""
        if self.start_in_s is None:
            return None
        return int((self.estimated_at + self.start_in_s) * 1000)

    def later_than(self, after_ms: int, sent_at_ms: int | None) -> bool:
        """Whether it starts more than ``after_ms`` after it was sent (``sent_at_ms``;
        unknown: from now). An unknown start counts as later: it waits behind a saturated
        pool that has not finished anything yet."""
        start = self.start_at_ms
        if start is None:
            return True
        origin = sent_at_ms if sent_at_ms is not None else int(self.estimated_at * 1000)
        return start - origin > after_ms


class LaneDepths:
    """One pool's ready requests per lane: as last read, plus this worker's changes."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._read: dict[str, int] = {}
        self._delta: dict[str, int] = {}
        self._read_at: float | None = None

    def stale(self, max_age_s: float) -> bool:
        """Never read, or read more than ``max_age_s`` ago."""
        return self._read_at is None or self._clock() - self._read_at > max_age_s

    def read(self, counts: Mapping[str, int]) -> None:
        """The lanes' ready counts as the broker reported them just now."""
        self._read, self._delta, self._read_at = dict(counts), {}, self._clock()

    def moved(self, lane: str) -> None:
        """This worker moved one request into ``lane``."""
        self._delta[lane] = self._delta.get(lane, 0) + 1

    def took(self, lane: str) -> None:
        """``lane`` delivered its head to this worker (it is no longer ready there)."""
        self._delta[lane] = self._delta.get(lane, 0) - 1

    def depth(self, lane: str) -> int:
        return max(0, self._read.get(lane, 0) + self._delta.get(lane, 0))


def requests_ahead(band: int, lane: str, bands: Sequence[Sequence[str]],
                   depths: LaneDepths, waiting_bands: Iterable[int]) -> int:
    """Requests that start before one about to join ``lane`` of ``band`` (see the
    module's docstring). ``bands``: each band's lanes, lowest band first;
    ``waiting_bands``: the band of each request waiting in this worker's admission."""
    own = depths.depth(lane)
    ahead = own + sum(1 for b in waiting_bands if b >= band)
    for index, lanes in enumerate(bands):
        if index > band:
            ahead += sum(depths.depth(other) for other in lanes)
        elif index == band:
            ahead += sum(min(depths.depth(other), own) for other in lanes if other != lane)
    return ahead


def estimate_wait(ahead: int, rate: ServiceRate, share: float,
                  wall: Callable[[], float] = time.time, *, in_lane: int = 0,
                  lane: ServiceRate | None = None) -> WaitEstimate:
    """The estimate for a request with ``ahead`` requests before it, ``in_lane`` of them
    in its own lane, from this worker's ``rate``, the starts from its ``lane`` and its
    ``share`` (> 0) of the pool's backends (see the module's docstring)."""
    per_token = rate.tokens_per_request()
    pool_rate = rate.recent_per_second() / share if share > 0 else 0.0
    start_in = (ahead + 1) / pool_rate if pool_rate > 0 else None
    if in_lane > 0 and lane is not None and share > 0 and lane.count() >= MIN_LANE_STARTS:
        lane_rate = lane.recent_per_second() / share
        if lane_rate > 0:
            start_in = max(start_in or 0.0, (in_lane + 1) / lane_rate)
    return WaitEstimate(
        position=ahead,
        tokens_ahead=None if per_token is None else ahead * per_token,
        start_in_s=start_in, estimated_at=wall())
