"""Fuzz: over a thousand malformed messages, interleaved with valid requests, at a live worker.

A seeded generator (``HUTCH_FUZZ_SEED`` picks another seed; the seed is printed) builds raw
AMQP messages that break the wire contract one to three ways at once: random bytes,
invalid UTF-8, truncated JSON, JSON of the wrong shape or types, a wrong content_type, an
oversized body, no correlation_id, no or a forged reply_to, a model no pool serves,
``"stream": "true"`` (not a boolean), a deadline already past, odd priorities (0..255)
and odd headers. They are published with confirms, all at once and in random order with
250 valid requests sent by :class:`HutchClient` and some valid raw requests with unusual
(but legal) properties.

What must hold afterwards: the worker still runs; every valid request got its own
completion; every malformed message is in the parking lot exactly once, with the reason
the contract gives; whoever could be answered got exactly one error reply with the right
code; nothing was ever sent to a forged ``reply_to``; the work and triage queues are empty;
only the requests meant for the backend reached it.

The expected outcome of each message is derived from the order in which the worker checks
a request (``pipeline.dispatch.decide.admit``; the alternate exchange catches unknown
models before any check): see :mod:`pipeline.testing.contract_oracle`, shared with
tests/test_properties.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import functools
import json
import os
import random
import string
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from decimal import Decimal
from typing import Any
from urllib.parse import quote

import aio_pika
import httpx
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage

from pipeline import protocol as p
from pipeline.broker.names import Names
from pipeline.broker.topology import apply_topology
from pipeline.client.client import HutchClient
from pipeline.testing.contract_oracle import Case
from pipeline.testing.contract_oracle import expect as _expect
from pipeline.testing.mock import MockBackend, MockConfig
from tests.conftest import SettingsFactory, amqp, queue_depth, running_worker

SEED = int(os.environ.get("HUTCH_FUZZ_SEED", "1009"))
N_MALFORMED = 1200
N_RAW_VALID = 120
N_CLIENT_VALID = 250
MAX_BODY_BYTES = 16_384  # small, so oversized bodies stay cheap; the check is the same
OVERSIZED = 12  # a few: each is up to 2 x MAX_BODY_BYTES
MODELS = ("mock-small", "mock-large")  # the pool's models (routing keys that route)
FUZZ_ID = "x-fuzz-id"
DIRECT_REPLY_TO = "amq.rabbitmq.reply-to"
# The whole exchange must finish well inside pytest-timeout's 120 s.
RUN_TIMEOUT_S = 50.0

# Bugs this fuzz found, all fixed: huge numeric headers overflowing int64 when echoed
# back, a forged x-death misleading triage on an unknown model, a negative
# x-hutch-attempts buying unlimited retries, a non-UTF-8 header that could not be parked.
# Each keeps a focused regression test below. A generator defect named here is left out
# of the big run (none now); HUTCH_FUZZ_KNOWN_BUGS=1 puts them back in.
KNOWN_BUGS: set[str] = set()

# -- generators ------------------------------------------------------------------------------


def _text(rng: random.Random, n: int = 12) -> str:
    alphabet = string.ascii_letters + string.digits + " éß漢字🐇\\\"'\t"
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(0, n)))


def _compact(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


def _valid_body(rng: random.Random, fuzz_id: str) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": rng.choice(MODELS),
        "messages": [{"role": "user", "content": f"fuzz {fuzz_id}"}],
    }
    if rng.random() < 0.3:
        body["messages"].insert(0, {"role": "system", "content": _text(rng)})
    if rng.random() < 0.3:
        body["max_tokens"] = rng.randint(20, 500)
    if rng.random() < 0.3:
        body["temperature"] = round(rng.uniform(0, 2), 3)
    if rng.random() < 0.2:
        body["user"] = _text(rng)  # unknown fields are passed through
    return body


class Latin1(str):
    """A str that goes on the wire as an AMQP long string in Latin-1, not UTF-8, as
    clients in other languages can send (pamqp encodes with ``str.encode``)."""

    def encode(self, encoding: str = "utf-8", errors: str = "strict") -> bytes:
        return str(self).encode("latin-1")


#: Numeric headers at the edge of int64 (see KNOWN_BUGS, "huge_number_header").
HUGE_NUMBER_HEADERS: list[dict[str, Any]] = [
    {p.H_SENT_AT: -(2**63)},
    {p.H_ATTEMPTS: 2**63 - 1},
    {p.H_ATTEMPTS: str(2**64)},
]


def _odd_header_value(rng: random.Random, depth: int = 0) -> Any:
    """A value of some AMQP field-table type; the parked copy must carry it through."""
    choices: list[Callable[[], Any]] = [
        lambda: rng.randint(-(2**63), 2**63 - 1),
        lambda: rng.randint(-100, 100),
        lambda: rng.uniform(-1e9, 1e9),
        lambda: rng.choice([True, False]),
        lambda: None,
        lambda: _text(rng, 40),
        lambda: bytearray(rng.randbytes(rng.randint(0, 20))),  # AMQP byte array ('x')
        lambda: Decimal(rng.randint(-10**6, 10**6)) / Decimal(100),
        lambda: datetime.datetime.fromtimestamp(rng.randint(0, 2**31), datetime.UTC),
    ]
    if depth < 3:
        choices.append(lambda: [_odd_header_value(rng, depth + 1) for _ in range(3)])
        choices.append(lambda: {f"k{i}": _odd_header_value(rng, depth + 1) for i in range(3)})
    return rng.choice(choices)()


def _base_case(rng: random.Random, fuzz_id: str, reply_queue: str) -> Case:
    headers: dict[str, Any] = {FUZZ_ID: fuzz_id}
    if rng.random() < 0.15:
        for i in range(rng.randint(1, 4)):
            headers[rng.choice(["x-fuzz-odd-", "x-fuzz-ключ-", "🐇"]) + str(i)] = (
                _odd_header_value(rng))
    return Case(
        fuzz_id=fuzz_id,
        body=_compact(_valid_body(rng, fuzz_id)),
        routing_key=rng.choice(MODELS),
        correlation_id=fuzz_id,
        reply_to=reply_queue,
        content_type="application/json",
        priority=rng.randint(0, 255),
        headers=headers,
    )


class Fuzzer:
    """Builds the cases from one seeded generator."""

    def __init__(self, seed: int, names: Names, reply_queue: str, victim_queue: str) -> None:
        self.rng = random.Random(seed)
        self.names = names
        self.reply_queue = reply_queue
        self.forged_reply_tos = [
            names.work_queue("chat"),  # would make the worker feed itself
            names.parked_queue,  # would add to the parking lot
            names.triage_queue,
            victim_queue,  # another prefix's reply queue
            names.requests_exchange,
            DIRECT_REPLY_TO,  # published from a channel that consumes it (or the broker
                              # closes the channel): see the test
            names.reply_queue(""),  # the reply prefix alone
            names.reply_queue("").rstrip("."),
            f"{names.prefix}.replyx.y",
            f"x{names.reply_queue('z')}",
        ]
        self.mutations: list[tuple[str, float, Callable[[Case], None]]] = [
            ("random_bytes", 6, self.random_bytes),
            ("invalid_utf8", 5, self.invalid_utf8),
            ("truncated_json", 6, self.truncated_json),
            ("not_an_object", 5, self.not_an_object),
            ("missing_field", 5, self.missing_field),
            ("messages_not_list", 4, self.messages_not_list),
            ("empty_messages", 3, self.empty_messages),
            ("bad_message", 5, self.bad_message),
            ("bad_param_type", 6, self.bad_param_type),
            ("bad_model", 4, self.bad_model),
            ("model_of_other_pool", 3, self.model_of_other_pool),
            ("stream", 4, self.stream),
            ("wrong_content_type", 5, self.wrong_content_type),
            ("missing_correlation_id", 5, self.missing_correlation_id),
            ("missing_reply_to", 5, self.missing_reply_to),
            ("forged_reply_to", 7, self.forged_reply_to),
            ("ghost_reply_to", 3, self.ghost_reply_to),
            ("unknown_model", 7, self.unknown_model),
            ("past_deadline", 6, self.past_deadline),
            ("backend_rejects", 3, self.backend_rejects),
        ]
        # Header oddities that must change nothing in the outcome, added on top.
        self.modifiers: list[tuple[str, Callable[[Case], None]]] = [
            ("non_utf8_header", self.non_utf8_header),
            ("forged_x_death", self.forged_x_death),
        ]
        self.modifiers = [m for m in self.modifiers if m[0] not in KNOWN_BUGS]

    # Body defects ---------------------------------------------------------------------

    def random_bytes(self, case: Case) -> None:
        # 0xff can never start JSON (nor appear in UTF-8): always unparseable.
        case.body = b"\xff" + self.rng.randbytes(self.rng.randint(0, 300))
        case.body_class = "invalid_json"

    def invalid_utf8(self, case: Case) -> None:
        bad = self.rng.choice([b"\xc3\x28", b"\xa0\xa1", b"\xed\xa0\x80", b"\xc0\xaf",
                               b"\xf8\x88\x80\x80\x80", b"\xe2\x28\xa1", b"\xff", b"\x00"])
        case.body = (b'{"model":"' + self.rng.choice(MODELS).encode()
                     + b'","messages":[{"role":"user","content":"abc' + bad + b'"}]}')
        case.body_class = "invalid_json"

    def truncated_json(self, case: Case) -> None:
        case.body = case.body[: self.rng.randrange(len(case.body))]
        case.body_class = "invalid_json"

    def not_an_object(self, case: Case) -> None:
        value = self.rng.choice([[1, 2], [], 42, -1.5, "mock-small", None, True,
                                 [{"model": "mock-small"}]])
        case.body = _compact(value)
        case.body_class = "invalid_request"

    def missing_field(self, case: Case) -> None:
        body = json.loads(case.body)
        del body[self.rng.choice(["model", "messages"])]
        case.body = _compact(body)
        case.body_class = "invalid_request"

    def messages_not_list(self, case: Case) -> None:
        body = json.loads(case.body)
        body["messages"] = self.rng.choice(["hi", {}, 5, None, {"role": "user"}])
        case.body = _compact(body)
        case.body_class = "invalid_request"

    def empty_messages(self, case: Case) -> None:
        body = json.loads(case.body)
        body["messages"] = []
        case.body = _compact(body)
        case.body_class = "invalid_request"

    def bad_message(self, case: Case) -> None:
        body = json.loads(case.body)
        body["messages"][-1] = self.rng.choice([
            {"content": "no role"},
            {"role": "", "content": "empty role"},
            {"role": 5, "content": "numeric role"},
            {"role": None},
            {"role": "user", "content": 5},
            {"role": "user", "content": {"text": "an object"}},
            {"role": "user", "content": True},
            "just a string",
            ["a", "list"],
        ])
        case.body = _compact(body)
        case.body_class = "invalid_request"

    def bad_param_type(self, case: Case) -> None:
        body = json.loads(case.body)
        if self.rng.random() < 0.5:
            # Not ints, or out of range ("10" or true would be coerced: not used here).
            body["max_tokens"] = self.rng.choice(["ten", 0, -3, 1.5, [], {}, [10]])
        else:
            body["temperature"] = self.rng.choice(["hot", -1, 2.5, 1e9, [], {}, [1]])
        case.body = _compact(body)
        case.body_class = "invalid_request"

    def bad_model(self, case: Case) -> None:
        body = json.loads(case.body)
        body["model"] = self.rng.choice([5, None, "", "m" * 300, ["mock-small"], {}])
        case.body = _compact(body)
        case.body_class = "invalid_request"

    def model_of_other_pool(self, case: Case) -> None:
        # The routing key leads to the pool; the body names a model it does not serve.
        body = json.loads(case.body)
        body["model"] = self.rng.choice(["gpt-4o", "mock-small ", "MOCK-SMALL", "llama"])
        case.body = _compact(body)
        case.body_class = "invalid_request"

    def stream(self, case: Case) -> None:
        body = json.loads(case.body)
        # Streaming is served, but only with a real boolean (or null, OpenAI's "not set"):
        # these are client bugs.
        body["stream"] = self.rng.choice(["true", 1, "yes", [True]])
        case.body = _compact(body)
        case.body_class = "invalid_request"

    def backend_rejects(self, case: Case) -> None:
        # Valid for Hutch (content is a list of anything), refused by the backend (400).
        body = json.loads(case.body)
        body["messages"][-1]["content"] = self.rng.choice(
            [[1, 2], ["text"], [{"type": "text", "text": 5}]])
        case.body = _compact(body)
        case.body_class = "backend_rejects"

    def oversized(self, case: Case) -> None:
        body = json.loads(case.body)
        size = self.rng.randint(MAX_BODY_BYTES + 1, 2 * MAX_BODY_BYTES)
        body["messages"][-1]["content"] = "x" * size
        case.body = _compact(body)
        case.too_large = True

    # Property defects -----------------------------------------------------------------

    def wrong_content_type(self, case: Case) -> None:
        case.content_type = self.rng.choice(["text/plain", "application/xml", "application/jsonp",
                                             "json", "application/x-www-form-urlencoded",
                                             "text/json; charset=utf-8"])
        case.bad_content_type = True

    def missing_correlation_id(self, case: Case) -> None:
        case.correlation_id = self.rng.choice([None, ""])

    def missing_reply_to(self, case: Case) -> None:
        case.reply_to = self.rng.choice([None, ""])
        case.reply_to_kind = "missing"

    def forged_reply_to(self, case: Case) -> None:
        case.reply_to = self.rng.choice(self.forged_reply_tos)
        case.reply_to_kind = "forged"

    def ghost_reply_to(self, case: Case) -> None:
        case.reply_to = self.names.reply_queue(f"ghost-{case.fuzz_id}")
        case.reply_to_kind = "ghost"

    def unknown_model(self, case: Case) -> None:
        case.routing_key = self.rng.choice(
            ["gpt-17", "", "mock-small ", "MOCK-SMALL", "mock-*", "#", "modèle-🐇",
             f"m{self.rng.randint(0, 10**9)}", "m" * 255])
        case.unroutable = True

    def past_deadline(self, case: Case) -> None:
        past = p.now_ms() - self.rng.randint(1_000, 10**9)
        case.headers[p.H_DEADLINE] = self.rng.choice([past, str(past), float(past), 0, -1])
        case.deadline_past = True

    def non_utf8_header(self, case: Case) -> None:
        case.headers["x-fuzz-latin1"] = Latin1("café")

    def forged_x_death(self, case: Case) -> None:
        case.headers["x-death"] = [{
            "reason": self.rng.choice(["maxlen", "expired", "rejected", "other", 5]),
            "queue": self.names.work_queue("chat"), "count": 1,
            "routing-keys": [self.rng.choice(MODELS)],
        }]

    # Whole messages -------------------------------------------------------------------

    def malformed(self, fuzz_id: str, oversized: bool = False) -> Case:
        case = _base_case(self.rng, fuzz_id, self.reply_queue)
        if oversized:
            case.defects.append("oversized")
            self.oversized(case)
        n = 1 if self.rng.random() < 0.75 else self.rng.randint(2, 3)
        weights = [w for _, w, _ in self.mutations]
        while len(case.defects) < n:
            name, _, mutate = self.rng.choices(self.mutations, weights)[0]
            # One defect per group: two body defects would not compose (a truncated body
            # cannot lose a field), and an oversized body must stay oversized.
            group = _group(name)
            if any(_group(d) == group for d in case.defects):
                continue
            case.defects.append(name)
            mutate(case)
        self._modify(case)
        _expect(case)
        assert case.malformed, case
        return case

    def _modify(self, case: Case) -> None:
        for name, modify in self.modifiers:
            if self.rng.random() < 0.05:
                case.defects.append(name)
                modify(case)

    def valid_raw(self, fuzz_id: str) -> Case:
        """Unusual but legal properties: each must be answered with its completion."""
        case = _base_case(self.rng, fuzz_id, self.reply_queue)
        variant = self.rng.choice([
            "content_type", "deadline_future", "deadline_garbage", "sent_at", "other_model_key",
            "attempts_header", "plain", "huge_number_header",
        ])
        while variant in KNOWN_BUGS:
            variant = "plain"
        self._modify(case)
        case.defects.append(f"valid:{variant}")
        if variant == "content_type":
            case.content_type = self.rng.choice(
                [None, "", "APPLICATION/JSON", "application/json; charset=utf-8"])
        elif variant == "deadline_future":
            case.headers[p.H_DEADLINE] = self.rng.choice(
                [p.now_ms() + 60_000, str(p.now_ms() + 60_000), 2**63 - 1])
        elif variant == "deadline_garbage":
            # Not a number: ignored, as if absent.
            case.headers[p.H_DEADLINE] = self.rng.choice(
                ["soon", True, False, None, [1, 2], {"at": 1}, bytearray(b"\xff"), ""])
        elif variant == "sent_at":
            case.headers[p.H_SENT_AT] = self.rng.choice(
                [p.now_ms() + 10**6, 0, -5, "yesterday", p.now_ms() - 3_600_000])
        elif variant == "other_model_key":
            # Routed by one model of the pool, naming the other: the same pool serves both.
            body = json.loads(case.body)
            body["model"] = "mock-large" if case.routing_key == "mock-small" else "mock-small"
            case.body = _compact(body)
        elif variant == "attempts_header":
            case.headers[p.H_ATTEMPTS] = self.rng.choice([1, 5, "x", 10**6])
        elif variant == "huge_number_header":
            case.headers.update(self.rng.choice(HUGE_NUMBER_HEADERS))
        _expect(case)
        assert case.reply == "ok", case
        return case


_BODY_DEFECTS = {
    "random_bytes", "invalid_utf8", "truncated_json", "not_an_object", "missing_field",
    "messages_not_list", "empty_messages", "bad_message", "bad_param_type", "bad_model",
    "model_of_other_pool", "stream", "backend_rejects", "oversized",
}
_REPLY_TO_DEFECTS = {"missing_reply_to", "forged_reply_to", "ghost_reply_to"}


def _group(defect: str) -> str:
    if defect in _BODY_DEFECTS:
        return "body"
    if defect in _REPLY_TO_DEFECTS:
        return "reply_to"
    return defect


# -- plumbing ---------------------------------------------------------------------------------




def _header_text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


# -- the test ---------------------------------------------------------------------------------


async def test_fuzz_malformed_messages_among_valid_requests(
        make_settings: SettingsFactory) -> None:
    started = time.monotonic()
    async with MockBackend(MockConfig(latency_ms=5, capacity=16)) as mock:
        settings = make_settings([("b1", mock.base_url, 8)], max_body_bytes=MAX_BODY_BYTES)
        names = Names(settings.prefix)
        await apply_topology(settings)
        raw_reply_queue = names.reply_queue("fuzz-raw")
        victim_queue = f"z{settings.prefix}.reply.victim"
        fuzzer = Fuzzer(SEED, names, raw_reply_queue, victim_queue)
        ids = iter(range(10**9))
        cases = [fuzzer.malformed(f"m{next(ids)}", oversized=i < OVERSIZED)
                 for i in range(N_MALFORMED)]
        cases += [fuzzer.valid_raw(f"v{next(ids)}") for _ in range(N_RAW_VALID)]
        by_id = {case.fuzz_id: case for case in cases}
        malformed = [case for case in cases if case.malformed]

        replies: dict[str, list[AbstractIncomingMessage]] = {}
        strays: list[AbstractIncomingMessage] = []

        async def on_reply(message: AbstractIncomingMessage) -> None:
            await message.ack()
            if message.correlation_id in by_id:
                replies.setdefault(message.correlation_id, []).append(message)
            else:
                strays.append(message)

        async with running_worker(settings) as worker, amqp(settings.amqp_url) as conn, \
                HutchClient.from_settings(settings) as client:
            worker_task = next(task for task in asyncio.all_tasks()
                               if getattr(task.get_coro(), "__qualname__", "") == "Worker.run")
            channel = await conn.channel(publisher_confirms=True)
            await channel.set_qos(prefetch_count=500)
            reply_q = await channel.declare_queue(raw_reply_queue, exclusive=True)
            victim = await channel.declare_queue(victim_queue, durable=True)
            await reply_q.consume(on_reply)
            exchange = await channel.get_exchange(names.requests_exchange)
            # Direct reply-to may only be named by a channel that consumes it; whatever
            # arrives there is a reply sent to a forged reply_to.
            drt_channel = await conn.channel(publisher_confirms=True)
            drt_received: list[AbstractIncomingMessage] = []

            async def on_direct_reply(message: AbstractIncomingMessage) -> None:
                drt_received.append(message)

            drt_queue = await drt_channel.get_queue(DIRECT_REPLY_TO, ensure=False)
            await drt_queue.consume(on_direct_reply, no_ack=True)
            drt_exchange = await drt_channel.get_exchange(names.requests_exchange)

            async def publish(case: Case) -> None:
                target = drt_exchange if case.reply_to == DIRECT_REPLY_TO else exchange
                await target.publish(aio_pika.Message(
                    case.body, correlation_id=case.correlation_id, reply_to=case.reply_to,
                    content_type=case.content_type, priority=case.priority,
                    headers=case.headers, delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                ), routing_key=case.routing_key)

            async def chat(i: int) -> str:
                completion = await client.chat(
                    model=fuzzer.rng.choice(MODELS), priority=fuzzer.rng.randint(0, 255),
                    messages=[{"role": "user", "content": f"valid {i}"}], timeout=45)
                content = completion.choices[0].message.content
                assert isinstance(content, str)
                return content

            jobs: list[Callable[[], Awaitable[str | None]]] = [
                functools.partial(publish, case) for case in cases]
            jobs += [functools.partial(chat, i) for i in range(N_CLIENT_VALID)]
            fuzzer.rng.shuffle(jobs)
            expected_replies = sum(1 for case in cases if case.reply is not None)

            async with asyncio.timeout(RUN_TIMEOUT_S):
                # All at once: publishes and chats interleave on the wire in random order.
                results = await asyncio.gather(*(job() for job in jobs))
                chats = [r for r in results if isinstance(r, str)]
                while (len(replies) < expected_replies
                       or await queue_depth(channel, names.parked_queue) < len(malformed)):
                    assert not worker_task.done(), "the worker stopped"
                    await asyncio.sleep(0.1)
            # Nothing more may arrive: no duplicates, no loops, no late replies.
            await asyncio.sleep(1.0)
            assert not worker_task.done(), "the worker stopped"
            assert set(worker.held_backends()) == {settings.pools[0].backends[0].name}

            parked: list[AbstractIncomingMessage] = []
            parked_queue = await channel.declare_queue(names.parked_queue, passive=True)
            while (message := await parked_queue.get(fail=False, no_ack=True)) is not None:
                parked.append(message)
            work_depth = await queue_depth(channel, names.work_queue("chat"))
            triage_depth = await queue_depth(channel, names.triage_queue)
            victim_depth = await queue_depth(channel, victim_queue)
            await victim.delete(if_unused=False, if_empty=False)

    # -- what became of everything ------------------------------------------------------
    elapsed = time.monotonic() - started
    parked_ids = Counter(_header_text((m.headers or {}).get(FUZZ_ID, "<none>")) for m in parked)
    reasons = Counter(_header_text((m.headers or {}).get(p.H_REASON)) for m in parked)
    defects = Counter(d for case in malformed for d in case.defects)
    answered_ok = sum(1 for msgs in replies.values() for m in msgs
                      if (m.headers or {}).get(p.H_OUTCOME) == "ok")
    print(f"\nfuzz seed {SEED}: sent {len(malformed)} malformed, {N_RAW_VALID} valid raw, "
          f"{N_CLIENT_VALID} valid via HutchClient in {elapsed:.1f}s")
    print(f"answered: {len(chats)} client completions, {answered_ok} raw completions, "
          f"{sum(len(v) for v in replies.values()) - answered_ok} error replies; "
          f"backend served {mock.stats()['served']}")
    print("parked by reason: " + ", ".join(f"{r}={n}" for r, n in sorted(reasons.items())))
    print("defects: " + ", ".join(f"{d}={n}" for d, n in sorted(defects.items())))

    # The valid requests: each its own completion.
    assert sorted(chats) == sorted(f"mock reply to: valid {i}" for i in range(N_CLIENT_VALID))
    assert client.dropped_replies == 0

    # Every malformed message parked exactly once, nothing else parked.
    problems: list[str] = []
    for fuzz_id, n in parked_ids.items():
        if fuzz_id not in by_id:
            problems.append(f"parked without a fuzz id we sent: {fuzz_id!r} x{n}")
        elif not by_id[fuzz_id].malformed or n > 1:
            problems.append(f"{fuzz_id} {by_id[fuzz_id].defects}: parked {n} times, expected "
                            f"{int(by_id[fuzz_id].malformed)}")
    problems += [f"{case.fuzz_id} {case.defects}: never parked, expected {case.reason}"
                 for case in malformed if case.fuzz_id not in parked_ids]
    for message in parked:
        headers = message.headers or {}
        case = by_id.get(_header_text(headers.get(FUZZ_ID)))
        if case is None:
            continue
        got = (_header_text(headers.get(p.H_REASON)), _header_text(headers.get(p.H_ERROR_CODE)))
        if got != (case.reason, case.code):
            problems.append(f"{case.fuzz_id} {case.defects}: parked as {got}, expected "
                            f"{(case.reason, case.code)}")
        if message.body != case.body:
            problems.append(f"{case.fuzz_id} {case.defects}: parked body differs")
        if message.priority != case.priority:
            problems.append(f"{case.fuzz_id}: parked priority {message.priority} != "
                            f"{case.priority}")
    # Exactly one reply where one is owed, with the right code; none anywhere else.
    for case in cases:
        got_replies = replies.get(case.fuzz_id, [])
        if case.reply is None:
            if got_replies:
                problems.append(f"{case.fuzz_id} {case.defects}: {len(got_replies)} replies, "
                                "expected none")
            continue
        if len(got_replies) != 1:
            problems.append(f"{case.fuzz_id} {case.defects}: {len(got_replies)} replies, "
                            f"expected one ({case.reply})")
            continue
        reply = got_replies[0]
        headers = reply.headers or {}
        if case.reply == "ok":
            content = (json.loads(reply.body)["choices"][0]["message"]["content"]
                       if headers.get(p.H_OUTCOME) == "ok" else None)
            if content != f"mock reply to: fuzz {case.fuzz_id}":
                problems.append(f"{case.fuzz_id} {case.defects}: expected a completion, got "
                                f"{reply.body[:200]!r}")
        else:
            error = json.loads(reply.body).get("error", {})
            if (headers.get(p.H_OUTCOME), error.get("code")) != ("error", case.reply):
                problems.append(f"{case.fuzz_id} {case.defects}: expected error {case.reply}, "
                                f"got {reply.body[:200]!r}")
    assert not problems, f"{len(problems)} problems:\n" + "\n".join(problems[:50])
    assert len(parked) == len(malformed)
    assert parked_ids == Counter({case.fuzz_id: 1 for case in malformed})
    assert not strays, f"replies with unknown correlation ids: {strays[:5]}"
    assert len(replies) == sum(1 for case in cases if case.reply is not None)

    # No reply went to a forged reply_to, and nothing is left behind.
    assert victim_depth == 0
    assert not drt_received, f"{len(drt_received)} replies went to direct reply-to"
    assert work_depth == 0
    assert triage_depth == 0
    # Only what was meant for the backend reached it, once: the valid requests (answered,
    # or parked when their reply queue did not exist) and those only the backend can refuse.
    stats = mock.stats()
    assert stats["served"] + stats["errors"] == N_CLIENT_VALID + sum(
        1 for c in cases if c.reaches_backend)
    assert stats["errors"] == sum(1 for c in cases if c.backend_refuses)
    assert stats["max_concurrency"] <= 8
    assert elapsed < RUN_TIMEOUT_S + 10


# -- regression tests for the bugs this fuzz found (all fixed) ----------------------------


@dataclass
class Rig:
    """A worker on a mock backend, and a raw publisher with a reply queue of its own."""

    settings: Any
    names: Names
    mock: MockBackend
    channel: AbstractChannel
    reply_queue: str
    replies: dict[str, list[AbstractIncomingMessage]]

    async def publish(self, cid: str, body: bytes, routing_key: str = "mock-small",
                      headers: dict[str, Any] | None = None) -> None:
        exchange = await self.channel.get_exchange(self.names.requests_exchange)
        await exchange.publish(aio_pika.Message(
            body, correlation_id=cid, reply_to=self.reply_queue,
            content_type="application/json", headers={FUZZ_ID: cid, **(headers or {})},
        ), routing_key=routing_key)

    async def settle(self, replies: int, parked: int, timeout: float = 6.0) -> None:
        """Wait until that many replies and parked messages are there (or the timeout),
        then a little more, so that extra ones would show."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                while (sum(len(v) for v in self.replies.values()) < replies
                       or await queue_depth(self.channel, self.names.parked_queue) < parked):
                    await asyncio.sleep(0.05)
        await asyncio.sleep(0.5)

    def codes(self) -> dict[str, list[str]]:
        return {cid: [_header_text((m.headers or {}).get(p.H_ERROR_CODE, "ok")) for m in msgs]
                for cid, msgs in self.replies.items()}

    async def parked(self) -> dict[str, list[str]]:
        queue = await self.channel.declare_queue(self.names.parked_queue, passive=True)
        out: dict[str, list[str]] = {}
        while (message := await queue.get(fail=False, no_ack=True)) is not None:
            headers = message.headers or {}
            out.setdefault(_header_text(headers.get(FUZZ_ID)), []).append(
                _header_text(headers.get(p.H_REASON)))
        return out

    async def unacked(self, queue: str) -> int:
        """Deliveries of ``queue`` held unacknowledged by a consumer (management API). Its
        numbers lag by up to the stats interval (5 s): poll for up to 8 s for a zero."""
        base, user, password = self.settings.management_api()
        url = f"{base}/api/queues/{quote(self.settings.vhost, safe='')}/{quote(queue, safe='')}"
        unacked = -1
        async with httpx.AsyncClient(auth=(user, password), timeout=10) as http:
            deadline = time.monotonic() + 8
            while time.monotonic() < deadline:
                data = (await http.get(url)).json()
                unacked = int(data.get("messages_unacknowledged", -1))
                if unacked == 0:
                    break
                await asyncio.sleep(0.2)
        return unacked


@contextlib.asynccontextmanager
async def rig(make_settings: SettingsFactory, mock_config: MockConfig | None = None,
              **overrides: Any) -> AsyncIterator[Rig]:
    async with MockBackend(mock_config or MockConfig(latency_ms=5, capacity=16)) as mock:
        settings = make_settings([("b1", mock.base_url, 8)], **overrides)
        names = Names(settings.prefix)
        await apply_topology(settings)
        async with running_worker(settings), amqp(settings.amqp_url) as conn:
            channel = await conn.channel(publisher_confirms=True)
            reply_queue = names.reply_queue("known-bugs")
            queue = await channel.declare_queue(reply_queue, exclusive=True)
            replies: dict[str, list[AbstractIncomingMessage]] = {}

            async def on_reply(message: AbstractIncomingMessage) -> None:
                await message.ack()
                replies.setdefault(message.correlation_id or "", []).append(message)

            await queue.consume(on_reply)
            yield Rig(settings, names, mock, channel, reply_queue, replies)


def _request(content: str = "hello") -> bytes:
    return _compact({"model": "mock-small", "messages": [{"role": "user", "content": content}]})


async def test_non_utf8_header_is_parked_once(make_settings: SettingsFactory) -> None:
    """A header that is an AMQP long string but not UTF-8 (pamqp decodes it as bytes,
    which it cannot encode) used to break parking: the request was answered up to three
    times and never parked; in triage the delivery stayed unacked and, triage_prefetch
    of them later, triage stopped answering anyone."""
    # triage_prefetch 2: two stuck deliveries are enough to stop triage altogether.
    async with rig(make_settings, triage_prefetch=2) as r:
        latin1 = {"x-fuzz-latin1": Latin1("café")}
        await r.publish("bad-json", b"{nope", headers=latin1)
        for i in range(3):
            await r.publish(f"unknown-{i}", _request(), routing_key="gpt-17", headers=latin1)
        await r.publish("unknown-plain", _request(), routing_key="gpt-17")
        await r.settle(replies=5, parked=5)
        expected = {"bad-json": ["invalid_request"], "unknown-plain": ["unknown_model"],
                    **{f"unknown-{i}": ["unknown_model"] for i in range(3)}}
        assert r.codes() == expected
        assert await r.parked() == {
            "bad-json": ["invalid_json"], "unknown-plain": ["unknown_model"],
            **{f"unknown-{i}": ["unknown_model"] for i in range(3)}}
        assert await r.unacked(r.names.triage_queue) == 0


async def test_known_bug_huge_number_headers(make_settings: SettingsFactory) -> None:
    async with rig(make_settings) as r:
        for i, headers in enumerate(HUGE_NUMBER_HEADERS):
            await r.publish(f"huge-{i}", _request(f"huge {i}"), headers=headers)
        await r.settle(replies=len(HUGE_NUMBER_HEADERS), parked=0)
        # Today: each is served by the backend, then answered backend_error and parked
        # "rejected" (via triage), because the completion's reply could not be encoded.
        assert r.codes() == {f"huge-{i}": ["ok"] for i in range(len(HUGE_NUMBER_HEADERS))}
        assert await r.parked() == {}


async def test_known_bug_forged_x_death(make_settings: SettingsFactory) -> None:
    async with rig(make_settings) as r:
        forged = {"x-death": [{"reason": "maxlen", "queue": r.names.work_queue("chat"),
                               "count": 1}]}
        await r.publish("forged", _request(), routing_key="gpt-17", headers=forged)
        await r.settle(replies=1, parked=1)
        # Today: answered queue_full and parked queue_full.
        assert r.codes() == {"forged": ["unknown_model"]}
        assert await r.parked() == {"forged": ["unknown_model"]}


async def test_known_bug_negative_attempts_header(make_settings: SettingsFactory) -> None:
    """Found while reviewing dispatch for the fuzz (not by the healthy-backend run): the
    worker trusts x-hutch-attempts from the client. With -50, a failing backend is called
    53 times instead of max_attempts (3), each trip through the retry tier."""
    failing = MockConfig(latency_ms=1, capacity=16, fail_rate=1.0)
    pool = {"max_attempts": 3, "attempts_per_delivery": 1, "retry_delays_ms": [20],
            "breaker_failures": 1000}
    async with rig(make_settings, failing, pool=pool) as r:
        await r.publish("normal", _request())
        await r.settle(replies=1, parked=1)
        assert r.codes() == {"normal": ["backend_error"]}
        assert r.mock.stats()["faults"]["failed"] == 3  # the cap works without the header
        r.mock.reset_stats()
        await r.publish("negative", _request(), headers={p.H_ATTEMPTS: -50})
        await r.settle(replies=2, parked=2, timeout=8)
        assert r.codes()["negative"] == ["backend_error"]
        # Today: 53 backend calls.
        assert r.mock.stats()["faults"]["failed"] == 3
