"""The scheduler's parts without a broker: admission permits and verdicts, the virtual
token counter, the fair policy's order, tenants and quotas."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import pytest

from pipeline.delivery import Delivery
from pipeline.errors import ConfigError
from pipeline.scheduling.policy import FairPolicy, FifoPolicy, PoolScheduler
from pipeline.scheduling.settings import PoolScheduling, TenantSettings
from pipeline.scheduling.tenants import QuotaMeter, TenantBook
from pipeline.scheduling.vtc import VirtualTokenCounter
from pipeline.settings import load_settings
from pipeline.worker.admission import Admission, Grant, Verdict


def delivery(tenant: str = "a", priority: int = 0, *, band: int = 0, sent: int = 0,
             lane: str | None = None, size: int = 400) -> Delivery:
    message: Any = SimpleNamespace(body=b"x" * size, priority=priority)
    d = Delivery(message=message, pool="p", backend="b", headers={}, client=tenant,
                 refusal=None, reply_to_ok=True, deadline_ms=None, sent_at_ms=sent,
                 prior_attempts=0, retries=0)
    d.tenant, d.band, d.served_priority, d.lane = tenant, band, priority, lane
    return d


def scheduler(**tenants: TenantSettings) -> PoolScheduler:
    book = TenantBook(dict(tenants))
    return PoolScheduler("p", PoolScheduling(), book)


# -- the virtual token counter -------------------------------------------------------------

def test_a_tenant_joining_a_backlog_is_lifted_not_favoured() -> None:
    pool = scheduler()
    policy = FairPolicy(pool)
    pool.vtc.charge("alice", 10_000, 1)
    policy.push(delivery("alice", sent=1))
    policy.push(delivery("bob", sent=2))  # idle until now: starts at alice's level
    assert pool.vtc.counter("bob") == pool.vtc.counter("alice")
    first = policy.pop()
    assert first is not None and first.tenant == "alice"  # the tie goes by arrival


def test_vtc_lifts_a_returning_tenant_to_the_backlogged_minimum() -> None:
    vtc = VirtualTokenCounter()
    vtc.charge("a", 1000, 1)
    vtc.charge("b", 400, 1)
    vtc.lift("c", backlogged_min=400)  # c was idle: no banked credit
    assert vtc.counter("c") == 400
    vtc.lift("a", backlogged_min=400)  # a lift never lowers
    assert vtc.counter("a") == 1000


def test_vtc_weights_divide_the_charge() -> None:
    vtc = VirtualTokenCounter()
    vtc.charge("heavy", 1000, 2.0)
    vtc.charge("light", 1000, 1.0)
    assert vtc.counter("heavy") == 500 and vtc.counter("light") == 1000


def test_vtc_forgets_idle_tenants_and_stays_bounded() -> None:
    vtc = VirtualTokenCounter(max_tenants=100)
    for i in range(5000):
        vtc.charge(f"t{i}", i, 1)
        vtc.picked(f"t{i}")
        vtc.forget_idle(set())
    assert len(vtc) <= 100


# -- the fair policy ---------------------------------------------------------------------

def test_fair_policy_serves_the_lowest_counter_then_priority_then_arrival() -> None:
    pool = scheduler()
    policy = FairPolicy(pool)
    for i in range(3):
        policy.push(delivery("alice", sent=i))
    policy.push(delivery("bob", priority=0, sent=10))  # lifted to alice's level
    policy.push(delivery("bob", priority=5, sent=11))
    pool.vtc.charge("alice", 10_000, 1)  # then alice is served a lot
    order = [(d.tenant, d.served_priority) for d in iter(policy.pop, None)]
    assert order[:2] == [("bob", 5), ("bob", 0)]
    assert [t for t, _ in order[2:]] == ["alice"] * 3


def test_fair_policy_bands_are_strict() -> None:
    pool = scheduler()
    policy = FairPolicy(pool)
    pool.vtc.charge("bob", 10**9, 1)  # however much bob was served, his band goes first
    policy.push(delivery("alice", band=0))
    policy.push(delivery("bob", band=1))
    first = policy.pop()
    assert first is not None and first.tenant == "bob"


def test_fair_policy_alternates_two_backlogged_tenants_by_tokens() -> None:
    pool = scheduler(heavy=TenantSettings(weight=2))
    policy = FairPolicy(pool)
    for i in range(300):
        policy.push(delivery("heavy", sent=i))
        policy.push(delivery("light", sent=i))
    served = {"heavy": 0, "light": 0}
    for _ in range(300):
        d = policy.pop()
        assert d is not None
        served[d.tenant] += 1
    assert served["heavy"] / served["light"] == pytest.approx(2.0, abs=0.05)


def test_last_movable_is_the_request_served_last_and_never_a_lane_head() -> None:
    pool = scheduler()
    policy = FairPolicy(pool)
    pool.vtc.charge("alice", 5000, 1)
    newest_alice = delivery("alice", sent=9)
    policy.push(delivery("alice", sent=1))
    policy.push(newest_alice)
    policy.push(delivery("bob", sent=5))
    assert policy.last_movable() is newest_alice
    lane_only = FairPolicy(pool)
    lane_only.push(delivery("alice", lane="p.lane.x"))
    assert lane_only.last_movable() is None


def test_fifo_policy_is_priority_then_arrival() -> None:
    policy = FifoPolicy()
    policy.push(delivery("a", 0, sent=1))
    policy.push(delivery("b", 3, sent=2))
    policy.push(delivery("c", 0, sent=0))
    assert [d.tenant for d in iter(policy.pop, None)] == ["b", "c", "a"]


# -- admission ---------------------------------------------------------------------------

def admission(limits: dict[str, int], pool: PoolScheduler | None = None, **kw: Any
              ) -> Admission:
    out = Admission((pool or scheduler()).policy(), **kw)
    for backend, limit in limits.items():
        out.set_limit(backend, limit)
    return out


def on(backend: str, d: Delivery) -> Delivery:
    d.backend = backend
    return d


async def test_admission_grants_permits_in_policy_order() -> None:
    pool = scheduler()
    gate = admission({"b": 1}, pool, lookahead=8)
    running = on("b", delivery("alice"))
    assert await gate.acquire(running) == Grant(Verdict.START, "b")
    waiters = [asyncio.create_task(gate.acquire(on("b", delivery(t, sent=i))))
               for i, t in enumerate(["alice", "alice", "bob"])]
    await asyncio.sleep(0)
    assert gate.waiting == 3
    pool.charge(running, 1000)  # alice's running request turns out long
    gate.release("b")
    await asyncio.sleep(0)
    done = [i for i, task in enumerate(waiters) if task.done()]
    assert done == [2]  # bob, though he came last
    gate.hand_back()
    assert [(await task).verdict for task in waiters[:2]] == [Verdict.HAND_BACK] * 2


async def test_a_waiting_request_starts_on_any_free_backend_of_the_pool() -> None:
    gate = admission({"a": 1, "b": 0}, lookahead=4)
    assert (await gate.acquire(on("a", delivery()))).backend == "a"
    waiter = asyncio.create_task(gate.acquire(on("a", delivery())))
    await asyncio.sleep(0)
    assert not waiter.done()
    gate.set_limit("b", 1)  # b starts serving: the request held for a goes there at once
    await asyncio.sleep(0)
    assert waiter.result() == Grant(Verdict.START, "b")


async def test_a_hand_over_waits_for_requests_another_consumer_started_on_it() -> None:
    """b's lease is handed over while a request a's consumer delivered runs on b's permit:
    ``drained`` waits for it, so the next holder of b never starts beside it."""
    gate = admission({"a": 0, "b": 1})
    assert await gate.acquire(on("a", delivery())) == Grant(Verdict.START, "b")
    gate.set_limit("b", 0)  # the hand-over: no new grants on b
    assert not await gate.drained("b", 0.01)  # still running there
    waiting = asyncio.create_task(gate.drained("b", 5))
    await asyncio.sleep(0)
    assert not waiting.done()
    gate.release("b")
    assert await waiting
    assert await gate.drained("a", 0)  # nothing ran on a


async def test_admission_moves_what_it_would_serve_last_when_saturated() -> None:
    gate = admission({"b": 1}, lookahead=2, sorts=True)
    assert (await gate.acquire(on("b", delivery("alice")))).verdict is Verdict.START
    tasks = [asyncio.create_task(gate.acquire(on("b", delivery("alice", sent=i))))
             for i in range(4)]
    await asyncio.sleep(0)
    verdicts = [task.result().verdict for task in tasks if task.done()]
    assert verdicts == [Verdict.MOVE, Verdict.MOVE]  # the two newest
    assert gate.waiting == 2
    gate.hand_back()
    await asyncio.gather(*tasks)


async def test_admission_limit_changes_never_exceed_the_permits() -> None:
    gate = admission({"b": 2})
    for _ in range(2):
        assert (await gate.acquire(on("b", delivery()))).verdict is Verdict.START
    gate.set_limit("b", 1)
    waiter = asyncio.create_task(gate.acquire(on("b", delivery())))
    gate.release("b")
    await asyncio.sleep(0)
    assert not waiter.done() and gate.in_use("b") == 1  # one still runs: at the limit
    gate.release("b")
    await asyncio.sleep(0)
    assert waiter.result().verdict is Verdict.START


async def test_nothing_serving_hands_everything_back_and_a_source_only_its_own() -> None:
    gate = admission({"a": 1, "b": 1}, lookahead=4)
    for backend in ("a", "b"):
        await gate.acquire(on(backend, delivery()))
    from_a = asyncio.create_task(gate.acquire(on("a", delivery())))
    from_b = asyncio.create_task(gate.acquire(on("b", delivery())))
    await asyncio.sleep(0)
    assert gate.hand_back(source="a") == 1  # a's consumer goes away: its own go back
    assert (await from_a).verdict is Verdict.HAND_BACK and not from_b.done()
    gate.set_limit("a", 0)
    gate.set_limit("b", 0)  # no backend of the pool serves here any more
    assert (await from_b).verdict is Verdict.HAND_BACK


async def test_a_cancelled_waiter_leaves_no_trace() -> None:
    gate = admission({"b": 1})
    await gate.acquire(on("b", delivery()))
    waiter = asyncio.create_task(gate.acquire(on("b", delivery())))
    await asyncio.sleep(0)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert gate.waiting == 0
    gate.release("b")
    assert gate.in_use() == 0


async def test_a_permit_freed_while_a_waiter_is_being_cancelled_is_not_lost() -> None:
    # A connection loss cancels every waiting task at once while running requests end:
    # a permit granted to a waiter whose cancellation is pending must stay free (it once
    # stayed taken forever, and the pool's last requests waited behind phantom permits).
    gate = admission({"b": 1})
    await gate.acquire(on("b", delivery()))
    waiter = asyncio.create_task(gate.acquire(on("b", delivery())))
    await asyncio.sleep(0)
    waiter.cancel()  # its future is cancelled now; the task runs its handler later
    gate.release("b")  # ...and the freed permit is offered to it first
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert (gate.in_use(), gate.waiting) == (0, 0)
    assert (await gate.acquire(on("b", delivery()))).verdict is Verdict.START


# -- tenants, ceilings, quotas, settings -------------------------------------------------

def test_tenants_come_from_the_validated_user_and_teams_share_one() -> None:
    book = TenantBook({"research": TenantSettings(users=["ann", "ben"], max_priority=3)})
    assert book.tenant_of("ann") == book.tenant_of("ben") == "research"
    assert book.tenant_of("carol") == "carol"
    assert book.tenant_of(None) == "default"
    assert book.served_priority("research", 9) == 3
    assert book.served_priority("carol", 9) == 9


def test_quota_marks_overflow_and_expires_after_a_minute() -> None:
    now = [0.0]
    book = TenantBook({"a": TenantSettings(tokens_per_minute=100), "z": TenantSettings(
        tokens_per_minute=0)})
    quota = QuotaMeter(book, clock=lambda: now[0])
    quota.record("a", 60)
    assert not quota.over("a")
    quota.record("a", 60)
    assert quota.over("a")
    now[0] = 61.0
    assert not quota.over("a") and quota.used("a") == 0
    assert quota.over("z")  # a quota of 0: only capacity nobody else wants


def test_overflow_tenants_go_after_everyone_within_quota() -> None:
    pool = scheduler(greedy=TenantSettings(tokens_per_minute=10))
    pool.quota.record("greedy", 50)
    policy = FairPolicy(pool)
    pool.vtc.charge("modest", 10**6, 1)  # even with a far higher counter
    policy.push(delivery("greedy"))
    policy.push(delivery("modest"))
    first = policy.pop()
    assert first is not None and first.tenant == "modest"


@pytest.mark.parametrize(("data", "key"), [
    ({"tenants": {"a": {"weight": 0}}}, "tenants.a.weight"),
    ({"tenants": {"a": {"weight": -1}}}, "tenants.a.weight"),
    ({"tenants": {"a": {"tokens_per_minute": -5}}}, "tenants.a.tokens_per_minute"),
    ({"tenants": {"a": {"users": ["u"]}, "b": {"users": ["u"]}}}, "tenants.b.users"),
    ({"tenants": {"bad name": {}}}, "tenants.bad name"),
])
def test_bad_tenant_configuration_names_the_key(data: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_settings(**data)


def test_bands_must_rise_and_start_at_zero() -> None:
    pool = {"name": "p", "models": ["m"],
            "backends": [{"name": "b", "url": "http://x/v1", "max_concurrency": 1}]}
    with pytest.raises(ConfigError, match="first band"):
        load_settings(pools=[{**pool, "scheduling": {"bands": [
            {"name": "x", "min_priority": 2}]}}])
    with pytest.raises(ConfigError, match="must rise"):
        load_settings(pools=[{**pool, "scheduling": {"bands": [
            {"name": "x", "min_priority": 0}, {"name": "y", "min_priority": 0}]}}])
    ok = load_settings(pools=[{**pool, "scheduling": {"bands": [
        {"name": "batch", "min_priority": 0}, {"name": "interactive", "min_priority": 5}]}}])
    assert ok.pools[0].scheduling.band_of(4) == 0 and ok.pools[0].scheduling.band_of(9) == 1


# -- charging, refunds and the metrics -----------------------------------------------------

def _meter() -> tuple[PoolScheduler, Any, Any]:
    from pipeline.observe.metrics import Metrics
    from pipeline.scheduling.meter import TenantMeter

    pool = scheduler()
    metrics = Metrics()
    return pool, TenantMeter({"p": pool}, metrics), metrics


def test_a_failed_or_cancelled_request_is_refunded() -> None:
    from pipeline.observe.hooks import Settlement
    from pipeline.outcome import Cancelled, Failed, Failure
    from pipeline.protocol import ErrorCode, ParkReason

    pool, meter, _ = _meter()
    for outcome in (Failed(Failure(ParkReason.BACKEND_ERROR, ErrorCode.BACKEND_ERROR, "x")),
                    Cancelled("in_flight")):
        d = delivery("alice")
        pool.started(d)
        assert pool.vtc.counter("alice") > 0
        meter.settled(d, outcome, Settlement("x"))
        assert pool.vtc.counter("alice") == pytest.approx(0.0)
        assert d.charged == pytest.approx(0.0)


def test_a_completion_is_trued_up_from_its_usage() -> None:
    from pipeline.models import Usage
    from pipeline.observe.hooks import Settlement
    from pipeline.outcome import Completed

    pool, meter, metrics = _meter()
    d = delivery("alice", size=4000)  # estimated 1,000 prompt tokens
    pool.started(d)
    meter.settled(d, Completed(b"{}", Usage(prompt_tokens=10, completion_tokens=5), 0.1),
                  Settlement("ok"))
    assert pool.vtc.counter("alice") == pytest.approx(10 + 2 * 5)
    assert metrics.registry.get_sample_value(
        "hutch_tenant_tokens_total",
        {"pool": "-", "tenant": "alice", "kind": "completion"}) == 5


def test_sample_exports_backlog_and_zeroes_tenants_that_left() -> None:
    from pipeline.scheduling.meter import sample

    pool, _, metrics = _meter()
    shown: dict[str, set[str]] = {}
    pool.arrived("alice")
    sample({"p": pool}, metrics, shown)
    value = metrics.registry.get_sample_value
    assert value("hutch_tenant_waiting", {"pool": "-", "tenant": "alice"}) == 1
    pool.left("alice")
    sample({"p": pool}, metrics, shown)
    assert value("hutch_tenant_waiting", {"pool": "-", "tenant": "alice"}) == 0


def test_tenant_labels_are_bounded() -> None:
    from pipeline.observe.metrics import MAX_TENANT_LABELS, OTHER_TENANT, Metrics

    metrics = Metrics()
    labels = {metrics.tenant_label(f"t{i}") for i in range(MAX_TENANT_LABELS * 3)}
    assert len(labels) == MAX_TENANT_LABELS + 1 and OTHER_TENANT in labels


def test_fairness_index_over_backlogged_tenants() -> None:
    now = [0.0]
    pool = PoolScheduler("p", PoolScheduling(), TenantBook({}), clock=lambda: now[0])
    pool.arrived("a")
    pool.arrived("b")
    pool.charge(delivery("a"), 100)
    pool.charge(delivery("b"), 100)
    now[0] = 61
    assert pool.fairness() == pytest.approx(1.0)
    pool.charge(delivery("a"), 300)
    now[0] = 122
    assert pool.fairness() == pytest.approx(0.5)  # one of two tenants got everything


def test_thousands_of_tenants_leave_bounded_state() -> None:
    pool = scheduler()
    policy = FairPolicy(pool)
    for i in range(20_000):
        policy.push(delivery(f"t{i}", sent=i))
        d = policy.pop()
        assert d is not None
        pool.charge(d, -d.charged)  # each one failed: refunded
    assert len(pool.waiting) == 0 and len(pool.vtc) < 1000


def test_status_lists_tenants_with_their_lane_backlog_and_share() -> None:
    from prometheus_client.parser import text_string_to_metric_families

    from pipeline.broker.names import Names
    from pipeline.observe.metrics import Metrics
    from pipeline.ops.status import StatusReport, format_status
    from pipeline.ops.tenant_status import tenant_rows, tenant_values
    from pipeline.scheduling.lanes import LaneMap

    settings = load_settings(pools=[{"name": "chat", "models": ["m"], "backends": [
        {"name": "b", "url": "http://x/v1", "max_concurrency": 1}]}])
    metrics = Metrics(settings=settings)
    metrics.tenant_tokens.labels("chat", "alice", "prompt").inc(300)
    metrics.tenant_tokens.labels("chat", "bob", "prompt").inc(100)
    metrics.tenant_waiting.labels("chat", "alice").set(4)
    from prometheus_client import generate_latest

    values: dict[str, Any] = {}
    for _ in range(2):  # two workers report: summed
        tenant_values(text_string_to_metric_families(
            generate_latest(metrics.registry).decode()), values)
    pool = settings.pools[0]
    alice_lane = LaneMap(Names(settings.prefix), "chat", pool.scheduling).lanes_of("alice")[0]
    rows = tenant_rows(settings, values, {alice_lane: 120})
    assert [(r.tenant, r.waiting, r.lane_messages, r.tokens, r.share) for r in rows] == [
        ("alice", 8, 120, 600, 75.0), ("bob", 0, None, 200, 25.0)]
    from pipeline.ops.status import QueueStatus

    parked = QueueStatus("llm.parked", "parked", messages=0)
    text = format_status(StatusReport("/", [parked], [], [], tenants=rows))
    assert "TENANT" in text and alice_lane in text


def test_a_running_streams_output_counts_before_it_ends() -> None:
    from pipeline.delivery import StreamProgress
    from pipeline.observe.hooks import Settlement
    from pipeline.outcome import Cancelled

    pool, meter, _ = _meter()
    d = delivery("alice", size=40)  # 10 prompt tokens
    pool.started(d)
    d.stream = StreamProgress("s", chunks=50)
    assert pool.counter("alice") == pytest.approx(10 + 2 * 50)
    meter.settled(d, Cancelled("in_flight"), Settlement("cancelled"))
    # Cancelled after 50 chunks: the prompt and the output it got stay charged.
    assert pool.counter("alice") == pytest.approx(10 + 2 * 50)
    assert pool.vtc.counter("alice") == pytest.approx(10 + 2 * 50)


def test_a_client_cannot_claim_another_tenant() -> None:
    from pipeline import protocol as p
    from pipeline.broker.names import Names
    from pipeline.settle.guard import ReplyGuard

    guard = ReplyGuard(Names("llm"), worker_user="worker", trusted_users=frozenset({"gw"}))
    book = TenantBook({})
    assert book.tenant_of(guard.client_user("mallory", {p.H_USER: "alice"})) == "mallory"
    assert book.tenant_of(guard.client_user("gw", {p.H_USER: "alice"})) == "alice"


def test_worker_users_may_read_every_lane_and_triage_knows_a_lanes_pool() -> None:
    import re as _re

    from pipeline.broker.names import Names
    from pipeline.worker.triage import triage_failure
    from topology.clients import worker_permissions

    names = Names("llm")
    lane = names.lane_queue("chat.eu", "default", 3)
    assert _re.fullmatch(worker_permissions(names).read, lane)
    death = {"x-death": [{"reason": "expired", "queue": lane, "count": 1}],
             "x-first-death-reason": "expired", "x-first-death-queue": lane}
    _, pool = triage_failure(death, lane, names, "llm.dlx")
    assert pool == "chat.eu"


def test_an_answer_without_usage_is_charged_for_its_text_not_its_envelope() -> None:
    import json as _json

    from pipeline.delivery import StreamProgress
    from pipeline.scheduling.meter import completion_estimate

    body = _json.dumps({"id": "x" * 80, "object": "chat.completion", "choices": [
        {"index": 0, "message": {"role": "assistant", "content": "y" * 40}}]}).encode()
    assert completion_estimate(delivery(), body) == 10
    streamed = delivery()
    streamed.stream = StreamProgress("s", chunks=32)
    assert completion_estimate(streamed, body) == 32
    assert completion_estimate(delivery(), b"not json at all!") == 4
