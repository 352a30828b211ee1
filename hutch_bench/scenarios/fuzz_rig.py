"""One live worker (and mock backend) that takes batches of raw requests and cancels, and
says what went against the contract: the harness of the property tests and of
``hutch bench scenario fuzz``.

A batch is published all at once (with confirms), with valid requests from a
:class:`HutchClient` alongside; then every case's answer is awaited (a stall if it does not
come within ``stall_s``) and compared with the shared oracle
(:mod:`pipeline.testing.contract_oracle`): the replies per correlation id (codes and
completions, as a multiset: duplicates share an id), the parked copies per case (reason and
code), nothing sent to a forged ``reply_to``, the worker still running.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import time
from collections import Counter
from collections.abc import AsyncIterator, Coroutine
from dataclasses import dataclass, field, replace
from typing import Any

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractExchange, AbstractIncomingMessage
from hypothesis import strategies as st

from hutch_bench.scenarios.fuzz_cases import (
    FUZZ_ID,
    MODELS,
    PLACEHOLDER,
    Batch,
    WireShape,
    batches,
)
from pipeline import protocol as p
from pipeline.broker.names import Names
from pipeline.broker.topology import apply_topology, delete_topology
from pipeline.client.client import HutchClient
from pipeline.runtime.background import running
from pipeline.settings import Settings, load_settings
from pipeline.testing.contract_oracle import Case, expect
from pipeline.testing.mock import MockBackend, MockConfig
from pipeline.worker.worker import Worker

__all__ = ["MAX_BODY_BYTES", "Tally", "WireRig", "wire_rig", "wire_settings"]

MAX_BODY_BYTES = 16_384  # small, so oversized bodies stay cheap; the check is the same
BACKEND_CAP = 16


def wire_settings(amqp_url: str, prefix: str, backend_url: str, **overrides: Any) -> Settings:
    """One pool ``chat`` (mock-small, mock-large) on one backend."""
    pool = {"name": "chat", "models": list(MODELS), "backends": [
        {"name": f"{prefix}-b1", "url": backend_url, "max_concurrency": BACKEND_CAP,
         "timeout_s": 10}]}
    return load_settings(amqp_url=amqp_url, prefix=prefix, pools=[pool], lease_retry_s=0.5,
                         shutdown_grace_s=10, max_body_bytes=MAX_BODY_BYTES, **overrides)


@dataclass
class Tally:
    """What the rig saw over all batches."""

    batches: int = 0
    cases: int = 0
    cancels: int = 0
    valid: int = 0
    stalls: int = 0
    crashes: int = 0
    problems: list[str] = field(default_factory=list)
    defects: Counter[str] = field(default_factory=Counter)


def _text(value: Any) -> str:
    return bytes(value).decode(errors="replace") if isinstance(value, bytes | bytearray) \
        else str(value)


def _reply_key(message: AbstractIncomingMessage) -> str:
    """A reply as the oracle names it: ``ok:<id in the completion>`` or its error code."""
    headers = message.headers or {}
    if headers.get(p.H_OUTCOME) == "ok":
        content = json.loads(message.body)["choices"][0]["message"]["content"]
        return "ok:" + str(content).removeprefix("mock reply to: fuzz ")
    return _text(headers.get(p.H_ERROR_CODE, "<none>"))


@dataclass
class WireRig:
    settings: Settings
    names: Names
    shape: WireShape
    mock: MockBackend
    worker: Worker
    worker_task: asyncio.Task[None]
    channel: AbstractChannel
    client: HutchClient
    stall_s: float = 20.0
    max_cases: int = 40
    min_cases: int = 1
    replies: dict[str, list[str]] = field(default_factory=dict)
    parked: dict[str, list[tuple[str, str]]] = field(default_factory=dict)
    tally: Tally = field(default_factory=Tally)
    _ids: itertools.count[int] = field(default_factory=itertools.count)

    def strategy(self) -> st.SearchStrategy[Batch]:
        return batches(self.shape, self.max_cases, self.min_cases)

    def check(self, example: Batch) -> Coroutine[Any, Any, list[str]]:
        return self.run(example)

    # -- receiving --------------------------------------------------------------------

    async def on_reply(self, message: AbstractIncomingMessage) -> None:
        await message.ack()
        self.replies.setdefault(message.correlation_id or "<none>", []).append(
            _reply_key(message))

    async def on_parked(self, message: AbstractIncomingMessage) -> None:
        await message.ack()
        headers = message.headers or {}
        self.parked.setdefault(_text(headers.get(FUZZ_ID, "<none>")), []).append(
            (_text(headers.get(p.H_REASON)), _text(headers.get(p.H_ERROR_CODE))))

    # -- one batch ----------------------------------------------------------------------

    def _assign(self, batch: Batch) -> list[Case]:
        """Fresh ids for the batch's cases (same length as the placeholder)."""
        ids = [f"f{next(self._ids):08d}" for _ in batch.cases]
        cases = []
        for i, (case, dup) in enumerate(zip(batch.cases, batch.duplicates, strict=True)):
            cid = case.correlation_id
            if cid == PLACEHOLDER:
                cid = ids[dup] if dup is not None else ids[i]
            headers = {k: (ids[i] if v == PLACEHOLDER else v) for k, v in case.headers.items()}
            cases.append(replace(case, fuzz_id=ids[i], correlation_id=cid, headers=headers,
                                 body=case.body.replace(PLACEHOLDER.encode(), ids[i].encode()),
                                 defects=list(case.defects)))
        return cases

    async def _cancel(self, exchange: AbstractExchange, cid: str | None, *, user: bool,
                      body: bytes = b"", reply_to: str | None = None,
                      headers: dict[str, Any] | None = None) -> None:
        await exchange.publish(aio_pika.Message(
            body, correlation_id=cid, reply_to=reply_to, headers=headers,
            user_id=self.settings.amqp_user if user else None), routing_key="")

    async def _tombstones(self, batch: Batch, cases: list[Case],
                          exchange: AbstractExchange) -> list[tuple[Any, str | None]]:
        """Publish the cancels that must land first; wait until the worker holds them.
        The racing ones are returned, with the id they name."""
        racing = []
        registered = []
        for cancel in batch.cancels:
            cid = cancel.correlation_id
            if cancel.target is not None:
                cid = cases[cancel.target].correlation_id
            sharing = [c for c in cases if cid and c.correlation_id == cid]
            effective = bool(cid) and cancel.user_id
            if effective and cancel.first and all(
                    c.reply_to_kind != "ghost" for c in sharing):
                for c in sharing:
                    c.cancelled = True
                    c.defects.append("cancelled")
                await self._cancel(exchange, cid, user=True, body=cancel.body,
                                   reply_to=cancel.reply_to, headers=cancel.headers)
                registered.append(cid)
            elif effective and sharing:
                for c in sharing:
                    expect(c)
                if all(c.reply == "ok" for c in sharing):
                    for c in sharing:
                        c.defects.append("cancel_races")
                    racing.append((cancel, cid))
                # else: its effect would depend on timing: not sent
            else:
                racing.append((cancel, cid))  # ignored by the worker whenever it lands
        cancelled = self.worker._cancels._cancelled  # what the registry holds
        async with asyncio.timeout(self.stall_s):
            # The registry has no event to wait on: poll it.
            while not all(cid in cancelled for cid in registered):  # noqa: ASYNC110
                await asyncio.sleep(0.01)
        return racing

    async def _publish(self, exchange: AbstractExchange, case: Case) -> None:
        await exchange.publish(aio_pika.Message(
            case.body, correlation_id=case.correlation_id, reply_to=case.reply_to,
            content_type=case.content_type, priority=case.priority, headers=case.headers,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT), routing_key=case.routing_key)

    async def _valid(self, i: int) -> str:
        completion = await self.client.chat(
            model=MODELS[i % 2], messages=[{"role": "user", "content": f"valid {i}"}],
            timeout=self.stall_s)
        return str(completion.choices[0].message.content)

    async def run(self, batch: Batch) -> list[str]:
        """Send one batch, wait for its answers, and return what went against the contract
        (also added to :attr:`tally`)."""
        cases = self._assign(batch)
        requests = await self.channel.get_exchange(self.names.requests_exchange)
        cancels = await self.channel.get_exchange(self.names.cancel_exchange)
        racing = await self._tombstones(batch, cases, cancels)
        for case in cases:
            expect(case)
        served_before = self.mock.stats()
        jobs: list[Any] = [self._publish(requests, case) for case in cases]
        jobs += [self._cancel(cancels, cid, user=c.user_id, body=c.body, reply_to=c.reply_to,
                              headers=c.headers) for c, cid in racing]
        valid_ids = [next(self._ids) for _ in range(batch.valid_alongside)]
        chats = [asyncio.ensure_future(self._valid(i)) for i in valid_ids]
        await asyncio.gather(*jobs)
        problems = await self._await_answers(cases)
        try:
            async with asyncio.timeout(self.stall_s):
                answers = await asyncio.gather(*chats, return_exceptions=True)
        except TimeoutError:
            answers = [TimeoutError()] * len(chats)
        for i, answer in zip(valid_ids, answers, strict=True):
            if answer != f"mock reply to: valid {i}":
                problems.append(f"valid request {i} alongside: {answer!r}")
        await asyncio.sleep(0.05)  # extras (a second reply, a loop) show by now
        problems += self._compare(cases)
        problems += self._backend_calls(cases, served_before, len(valid_ids))
        problems += await self._nothing_stray()
        if self.worker_task.done():
            problems.append("the worker stopped")
            self.tally.crashes += 1
        self._count(batch, cases, problems)
        return problems

    def _expected_replies(self, cases: list[Case]) -> dict[str, Counter[str]]:
        out: dict[str, Counter[str]] = {}
        for case in cases:
            if case.reply is not None:
                key = f"ok:{case.fuzz_id}" if case.reply == "ok" else case.reply
                out.setdefault(case.correlation_id or "", Counter())[key] += 1
        return out

    async def _await_answers(self, cases: list[Case]) -> list[str]:
        expected = self._expected_replies(cases)
        parked = {c.fuzz_id for c in cases if c.reason is not None}
        started = time.monotonic()
        while (any(len(self.replies.get(cid, [])) < sum(n.values())
                   for cid, n in expected.items())
               or any(fid not in self.parked for fid in parked)):
            if self.worker_task.done() or time.monotonic() - started > self.stall_s:
                self.tally.stalls += not self.worker_task.done()
                return [f"stalled: no answer within {self.stall_s:g}s"]
            await asyncio.sleep(0.01)
        return []

    def _compare(self, cases: list[Case]) -> list[str]:
        problems = []
        by_cid: dict[str, list[Case]] = {}
        for case in cases:
            by_cid.setdefault(case.correlation_id or "", []).append(case)
        for cid, group in by_cid.items():
            want = self._expected_replies(group).get(cid, Counter())
            got = Counter(self.replies.pop(cid, []))
            races = [c for c in group if "cancel_races" in c.defects]
            if races and got != want:
                # A racing cancel: each of those may be answered cancelled instead.
                got_ok = got - Counter({"cancelled": got["cancelled"]})
                if got_ok <= want and sum(got.values()) == sum(want.values()):
                    got = want
            if cid and got != want:
                problems.append(f"{cid}: replies {dict(got)}, expected {dict(want)}: "
                                f"{[c.defects for c in group]}")
        for case in cases:
            want_parked = [(case.reason, case.code)] if case.reason is not None else []
            got_parked = self.parked.pop(case.fuzz_id, [])
            if got_parked != want_parked:
                problems.append(f"{case.fuzz_id}: parked {got_parked}, expected "
                                f"{want_parked}: {case.defects}")
        return problems

    def _backend_calls(self, cases: list[Case], before: dict[str, Any], valid: int
                       ) -> list[str]:
        after = self.mock.stats()
        calls = (after["served"] + after["errors"]) - (before["served"] + before["errors"])
        want = valid + sum(1 for c in cases if c.reaches_backend)
        races = sum(1 for c in cases if "cancel_races" in c.defects)
        if not want - races <= calls <= want:
            return [f"backend called {calls} times, expected {want} ({races} racing cancels)"]
        return []

    async def _nothing_stray(self) -> list[str]:
        """No reply for an id nobody sent, nothing parked without a case, the forged
        targets and the work queues empty."""
        problems = []
        if self.replies:
            problems.append(f"stray replies: {dict(list(self.replies.items())[:5])}")
            self.replies.clear()
        if self.parked:
            problems.append(f"stray parked messages: {dict(list(self.parked.items())[:5])}")
            self.parked.clear()
        for name in (*self.shape.forged_reply_tos[:3], self.names.triage_queue):
            queue = await self.channel.declare_queue(name, passive=True)
            if queue.declaration_result.message_count:
                problems.append(f"{queue.declaration_result.message_count} messages in {name}")
                await queue.purge()
        return problems

    def _count(self, batch: Batch, cases: list[Case], problems: list[str]) -> None:
        tally = self.tally
        tally.batches += 1
        tally.cases += len(cases)
        tally.cancels += len(batch.cancels)
        tally.valid += batch.valid_alongside
        tally.defects.update(d.split(":")[0] for c in cases for d in c.defects[:1])
        tally.problems += problems


@contextlib.asynccontextmanager
async def _deleted(settings: Settings, client_ids: list[str]) -> AsyncIterator[None]:
    try:
        yield
    finally:
        with contextlib.suppress(Exception):
            await delete_topology(settings, reply_queues=client_ids)


@contextlib.asynccontextmanager
async def wire_rig(amqp_url: str, prefix: str, *, stall_s: float = 20.0
                   ) -> AsyncIterator[WireRig]:
    """A mock backend, the topology, a worker, a client, and the consumers the rig reads;
    the topology and the client's reply queue are deleted on exit."""
    async with MockBackend(MockConfig(latency_ms=2, capacity=2 * BACKEND_CAP)) as mock:
        settings = wire_settings(amqp_url, prefix, mock.base_url)
        names = Names(prefix)
        await apply_topology(settings)
        worker = Worker(settings)
        async with _deleted(settings, client_ids=["fuzz"]), \
                running(worker.run(), ready=lambda: bool(worker.held_backends()),
                        stop=worker.stop, stop_timeout_s=20) as task, \
                await aio_pika.connect(settings.amqp_url) as connection, \
                HutchClient.from_settings(settings, client_id="fuzz") as client:
            channel = await connection.channel(publisher_confirms=True)
            await channel.set_qos(prefetch_count=1000)
            reply_queue = names.reply_queue("fuzz-raw")
            victim = f"z{prefix}.reply.victim"
            shape = WireShape(
                reply_queue=reply_queue, ghost_reply_to=names.reply_queue("ghost"),
                forged_reply_tos=(victim, names.parked_queue, names.work_queue("chat"),
                                  names.triage_queue, names.requests_exchange,
                                  names.reply_queue(""), f"x{names.reply_queue('z')}",
                                  "amq.gen-JzTY20BRgKO-HjmUJj0wLg"),
                max_body_bytes=MAX_BODY_BYTES)
            await channel.declare_queue(victim, exclusive=True)
            rig = WireRig(settings, names, shape, mock, worker, task, channel, client,
                          stall_s=stall_s)
            replies = await channel.declare_queue(reply_queue, exclusive=True)
            await replies.consume(rig.on_reply)
            parked = await channel.declare_queue(names.parked_queue, passive=True)
            await parked.consume(rig.on_parked)
            yield rig
