"""Per-request wait estimates (pipeline.capacity.wait), the status message a worker sends
and how clients read it: pure, fake clocks, fake messages and a recording publisher."""

from __future__ import annotations

import json

import pytest

from pipeline import protocol as p
from pipeline.capacity.backlog import ServiceRate
from pipeline.capacity.wait import LaneDepths, WaitEstimate, estimate_wait, requests_ahead
from pipeline.client.messages import request_headers
from pipeline.client.router import ReplyRouter
from pipeline.gateway.responses import sse_queued
from pipeline.models import QueueStatus
from pipeline.outcome import RetryLater
from pipeline.worker.wait_notice import status_body
from tests.fakes import delivery, settled_of
from tests.test_backlog import Clock
from tests.test_client_stream import FakeHost, Msg, final, make_stream, text_of, word_chunks
from tests.test_settle import RecordingPublisher, headers, settler

LOW = ["lane.low.0", "lane.low.1", "lane.low.2"]
HIGH = ["lane.high.0", "lane.high.1"]


def depths(counts: dict[str, int], clock: Clock | None = None) -> LaneDepths:
    lanes = LaneDepths(clock or Clock())
    lanes.read(counts)
    return lanes


def test_ahead_counts_higher_bands_whole_and_the_own_band_by_turns() -> None:
    lanes = depths({"lane.low.0": 10, "lane.low.1": 3, "lane.low.2": 50,
                    "lane.high.0": 4, "lane.high.1": 1})
    # Joining lane.low.0 behind 10: lane.low.1 serves its 3, lane.low.2 ten turns of its
    # 50, every high request goes first, and so do the two waiting in the worker at or
    # above its band (the one below does not).
    ahead = requests_ahead(0, "lane.low.0", [LOW, HIGH], lanes, waiting_bands=[0, 1])
    assert ahead == 10 + 3 + 10 + 5 + 2
    # A high request: only its own band counts.
    assert requests_ahead(1, "lane.high.1", [LOW, HIGH], lanes, [0, 0, 1]) == 1 + 1 + 1
    # An empty lane with others busy: nothing of theirs comes first by turns.
    assert requests_ahead(0, "lane.low.0", [LOW, HIGH], depths({"lane.low.2": 9}), []) == 0


def test_lane_depths_follow_this_workers_moves_between_reads() -> None:
    clock = Clock()
    lanes = depths({"a": 5}, clock)
    lanes.moved("a")
    lanes.moved("b")
    lanes.took("a")
    lanes.took("c")
    assert (lanes.depth("a"), lanes.depth("b"), lanes.depth("c")) == (5, 1, 0)
    assert not lanes.stale(1.0)
    clock.now += 1.5
    assert lanes.stale(1.0)
    lanes.read({"a": 2})  # a new read replaces the corrections
    assert (lanes.depth("a"), lanes.depth("b")) == (2, 0) and not lanes.stale(1.0)
    assert LaneDepths(clock).stale(1.0)  # never read


def test_the_estimate_divides_what_is_ahead_by_the_pools_rate() -> None:
    clock = Clock()
    rate = ServiceRate(window_s=60, clock=clock)
    for _ in range(21):  # 21 completions over 10 s: 2 per second here
        rate.completed(100)
        clock.now += 0.5
    clock.now -= 0.5
    # This worker holds half the pool's backends: the pool does 4 per second; 39 ahead,
    # so it starts when 40 more have ended.
    estimate = estimate_wait(39, rate, share=0.5, wall=lambda: 1_000_000.0)
    assert estimate.position == 39 and estimate.tokens_ahead == 3900
    assert estimate.start_in_s == pytest.approx(10.0)
    assert estimate.start_at_ms == 1_000_010_000
    unknown = estimate_wait(3, ServiceRate(clock=clock), share=1.0, wall=lambda: 5.0)
    assert unknown.start_in_s is None and unknown.start_at_ms is None
    assert unknown.tokens_ahead is None and unknown.position == 3


def test_a_lane_served_at_its_share_waits_longer_than_the_pool_rate_says() -> None:
    clock = Clock()
    pool, lane = ServiceRate(clock=clock), ServiceRate(clock=clock)
    for i in range(100):  # the pool does 10 per second, this lane gets 1 turn in 4
        pool.completed(None)
        if i % 4 == 0:
            lane.completed(None)
        clock.now += 0.1
    # 19 ahead in its lane, 30 ahead in all: the pool's rate says ~3 s, the lane's pace
    # (2.5 per second) ~8 s: the later one.
    paced = estimate_wait(30, pool, 1.0, wall=lambda: 0.0, in_lane=19, lane=lane)
    assert paced.start_in_s == pytest.approx(20 / 2.5, rel=0.05) and paced.position == 30
    # An empty lane, or one too little seen, leaves the pool's figure.
    assert estimate_wait(30, pool, 1.0, in_lane=0, lane=lane).start_in_s == pytest.approx(
        3.1, rel=0.05)
    few = ServiceRate(clock=clock)
    few.completed(None)
    assert estimate_wait(30, pool, 1.0, in_lane=19, lane=few).start_in_s == pytest.approx(
        3.1, rel=0.05)


def test_the_recent_rate_follows_a_flood_after_a_quiet_minute() -> None:
    clock = Clock()
    rate = ServiceRate(window_s=60, clock=clock)
    for _ in range(5):  # quiet: one every 10 s
        rate.completed(None)
        clock.now += 10
    for _ in range(400):  # then 100 per second for 4 s
        rate.completed(None)
        clock.now += 0.01
    assert rate.per_second() < 10  # the window's average hides the flood
    assert rate.recent_per_second() == pytest.approx(100, rel=0.02)
    clock.now += 4  # nothing completes any more: the recent rate falls
    assert rate.recent_per_second() < 40


def test_a_start_later_than_the_threshold_counts_from_the_send() -> None:
    estimate = WaitEstimate(10, None, start_in_s=2.0, estimated_at=100.0)  # starts at 102 s
    assert estimate.later_than(1500, sent_at_ms=100_000)
    assert not estimate.later_than(2500, sent_at_ms=100_000)
    assert estimate.later_than(2500, sent_at_ms=99_000)  # it was sent a second earlier
    assert not estimate.later_than(2500, sent_at_ms=None)  # unknown: from now
    assert WaitEstimate(0, None, None, 100.0).later_than(60_000, 100_000)  # unknown start


def test_the_status_body_is_the_contracts() -> None:
    body = json.loads(status_body("chat", WaitEstimate(812, 48720.4, 7.9, 1_765_000_000.0)))
    assert body == {"object": "hutch.queue_status", "pool": "chat", "position": 812,
                    "tokens_ahead": 48720, "estimated_start_s": 7.9,
                    "estimated_start_at_ms": 1_765_000_007_900,
                    "estimated_at_ms": 1_765_000_000_000}
    comment = sse_queued(QueueStatus.model_validate(body))
    assert comment == (b": queued position=812 tokens_ahead=48720 estimated_start_s=7.9 "
                       b"estimated_start_at=2025-12-06T05:46:47.900Z\n\n")
    assert sse_queued(QueueStatus(position=3)).startswith(
        b": queued position=3 tokens_ahead=- estimated_start_s=- estimated_start_at=-")


def test_the_client_asks_with_a_header_in_milliseconds() -> None:
    assert request_headers(None, None, 2.5) == {p.H_STATUS_AFTER_MS: 2500}
    assert p.H_STATUS_AFTER_MS not in request_headers(None, {"x": 1})
    with pytest.raises(ValueError):
        request_headers(None, None, -1)
    assert p.status_after_ms({p.H_STATUS_AFTER_MS: "junk"}) is None
    assert p.status_after_ms({p.H_STATUS_AFTER_MS: 0}) == 0


def status_message(cid: str = "c1", position: int = 5) -> Msg:
    return Msg({p.H_KIND: p.KIND_STATUS, p.H_POOL: "chat"},
               QueueStatus(pool="chat", position=position).model_dump_json().encode(), cid)


async def test_a_status_message_is_never_a_plain_calls_answer() -> None:
    router = ReplyRouter()
    seen: list[QueueStatus] = []
    future = router.expect("c1")
    router.watch_status("c1", seen.append)
    router.route(status_message())
    assert not future.done() and [s.position for s in seen] == [5]
    router.route(final(None, cid="c1"))
    assert future.done() and (await future).headers[p.H_KIND] == p.KIND_FINAL
    router.forget("c1")
    router.route(status_message())  # late: nobody watches any more
    assert len(seen) == 1 and router.dropped_replies == 0
    router.route(status_message("nobody"))  # never an orphan "answer" for result()
    assert router.claim_orphan("nobody") is None


async def test_a_failing_status_callback_does_not_break_the_reply_consumer() -> None:
    router = ReplyRouter()
    future = router.expect("c1")

    def broken(status: QueueStatus) -> None:
        raise RuntimeError("the application's bug")

    router.watch_status("c1", broken)
    router.route(status_message())
    router.route(Msg({p.H_KIND: p.KIND_STATUS}, b"{junk", "c1"))  # unreadable: ignored
    router.route(final(None, cid="c1"))
    assert future.done()


async def test_a_streams_status_is_shown_beside_its_chunks_not_among_them() -> None:
    host = FakeHost()
    async with make_stream(host) as stream:
        seen: list[QueueStatus] = []
        stream.on_status = seen.append
        host.router.route(Msg({p.H_KIND: p.KIND_STATUS}, b"not json", "c1"))  # ignored
        host.router.route(status_message(position=9))
        for message in [*word_chunks("A"), final("A")]:
            host.router.route(message)
        chunks = [c async for c in stream]
        completion = await stream.completion()
    assert stream.queue_status is not None and stream.queue_status.position == 9
    assert [s.position for s in seen] == [9]
    assert text_of(chunks) == completion.choices[0].message.content


async def test_the_status_message_is_transient_typed_and_marks_later_copies() -> None:
    publisher = RecordingPublisher()
    s, hook = settler(publisher)
    d = delivery(headers={p.H_STATUS_AFTER_MS: 0})
    assert d.status_after_ms == 0 and not d.status_sent
    assert await s.queue_status(d, b'{"object":"hutch.queue_status"}')
    [(exchange, key, _, props)] = publisher.sent
    assert (exchange, key) == ("", "llm.reply.app") and props.correlation_id == "req-1"
    sent = headers(props)
    assert sent[p.H_KIND] == p.KIND_STATUS and p.H_OUTCOME not in sent
    assert props.delivery_mode == 1 and settled_of(d) == [] and hook.events == []
    d.status_sent = True  # a lane or retry copy says so: the next worker does not tell it
    await s.settle(d, RetryLater(1000, "x", "other"))
    assert headers(publisher.sent[-1][3])[p.H_STATUS_SENT] == 1
    assert delivery(headers={p.H_STATUS_SENT: 1}).status_sent
    forged = delivery(user_id="mallory", reply_to="llm.reply.app")  # not its reply queue
    assert not await s.queue_status(forged, b"{}") and len(publisher.sent) == 2
