"""Per-client users, least permissions, the reply_to check and secrets, on the real broker.

Every user made here has a name of this test's own and is deleted at the end, even when
the test fails. The topology is applied by the session's administrator (as in a real
deployment: applying it is an operator's job); clients and workers then run as
least-privilege users made by :mod:`topology.clients`.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import secrets
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from types import SimpleNamespace
from typing import Any, cast

import aio_pika
import aiormq
import httpx
import pytest
from aio_pika.abc import (
    AbstractChannel,
    AbstractConnection,
    AbstractIncomingMessage,
    AbstractQueue,
)
from aiohttp import web
from prometheus_client import generate_latest

from pipeline import protocol as p
from pipeline.broker.names import Names
from pipeline.broker.topology import apply_topology
from pipeline.client.client import HutchClient
from pipeline.errors import BackendError, ConfigError, UnknownModelError, UserError
from pipeline.observe.log import configure_logging
from pipeline.observe.metrics import Metrics
from pipeline.settings import Settings
from pipeline.settle.guard import ReplyGuard
from pipeline.testing.mock import MockBackend, MockConfig
from tests.conftest import SettingsFactory, body, drain_queue, queue_depth, running_worker
from topology.clients import (
    CLIENT_TAG,
    WORKER_TAG,
    NewUser,
    add_client,
    add_worker_user,
    client_permissions,
    list_users,
    remove_client,
    remove_worker_user,
    worker_permissions,
)

# -- fixtures ---------------------------------------------------------------------------

UserMaker = Callable[..., Awaitable[NewUser]]


@pytest.fixture
async def make_user(make_settings: SettingsFactory, prefix: str) -> AsyncIterator[UserMaker]:
    """Create Hutch users named ``<prefix>-<suffix>``; all are deleted at the end."""
    admin = make_settings()
    made: list[str] = []

    async def factory(suffix: str, role: str = "client", settings: Settings | None = None,
                      password: str | None = None) -> NewUser:
        name = f"{prefix}-{suffix}"
        made.append(name)
        add = add_client if role == "client" else add_worker_user
        return await add(settings or admin, name, password)

    try:
        yield factory
    finally:
        base, user, password = admin.management_api()
        async with httpx.AsyncClient(auth=(user, password), timeout=10) as http:
            for name in made:
                await http.delete(f"{base}/api/users/{name}")


@contextlib.asynccontextmanager
async def connect(url: str) -> AsyncIterator[AbstractConnection]:
    connection = await aio_pika.connect(url, timeout=10)
    async with connection:
        yield connection


async def refused(connection: AbstractConnection, operation: Callable[[AbstractChannel],
                  Awaitable[Any]], error: type[Exception] = aiormq.exceptions.ChannelAccessRefused
                  ) -> str:
    """Run ``operation`` on a fresh confirming channel; it must fail with ``error``."""
    channel = await connection.channel(publisher_confirms=True)
    with pytest.raises(error) as exc:
        await operation(channel)
    return str(exc.value)


async def publish(channel: AbstractChannel, exchange: str, routing_key: str,
                  payload: bytes = b"{}", **props: Any) -> None:
    target = (channel.default_exchange if exchange == ""
              else await channel.get_exchange(exchange, ensure=False))
    await target.publish(aio_pika.Message(payload, **props), routing_key)


async def queue(channel: AbstractChannel, name: str) -> AbstractQueue:
    return await channel.get_queue(name, ensure=False)


class Collector:
    """Everything that arrives in a queue, consumed as the given user."""

    def __init__(self) -> None:
        self.messages: list[AbstractIncomingMessage] = []

    async def __call__(self, message: AbstractIncomingMessage) -> None:
        self.messages.append(message)
        await message.ack()


async def _depth_at_least(channel: AbstractChannel, name: str, n: int) -> bool:
    return await queue_depth(channel, name) >= n


async def wait_depth(channel: AbstractChannel, name: str, n: int, timeout: float = 15) -> None:
    async with asyncio.timeout(timeout):
        while not await _depth_at_least(channel, name, n):
            await asyncio.sleep(0.05)


# -- permissions, as strings ------------------------------------------------------------


def test_permission_patterns() -> None:
    names = Names("llm")
    client = client_permissions(names, "billing")
    assert client.as_json() == {
        "configure": r"^llm\.reply\.billing(\..+)?$",
        "write": r"^(llm\.requests|llm\.cancel)$",
        "read": r"^llm\.reply\.billing(\..+)?$",
    }
    worker = worker_permissions(names)
    assert worker.as_json() == {
        "configure": r"^(llm\.lease\..+|llm\.cancel\..+)$",
        "write": r"^(amq\.default|llm\.retry|llm\.cancel\..+)$",
        "read": r"^(llm\.work\..+|llm\.lane\..+|llm\.lease\..+|llm\.triage|llm\.workers"
                r"|llm\.workers\..+"
                r"|llm\.cancel|llm\.cancel\..+)$",
    }
    # Prefix characters that mean something in a regex are escaped.
    assert client_permissions(Names("a-b.c"), "x").write == (
        r"^(a\-b\.c\.requests|a\-b\.c\.cancel)$")


async def test_user_names_and_passwords_are_checked(make_settings: SettingsFactory) -> None:
    settings = make_settings()
    for bad in ("app.x", ".app", "", "a b", "x" * 101, "-app"):
        with pytest.raises(ConfigError):
            await add_client(settings, bad)
    with pytest.raises(ConfigError, match="12 characters"):
        await add_client(settings, "short-pw", "tooshort")


# -- the reply_to check, as logic ---------------------------------------------------------


def _request(user_id: str | None, reply_to: str | None,
             headers: dict[str, Any] | None = None) -> AbstractIncomingMessage:
    return cast(AbstractIncomingMessage,
                SimpleNamespace(user_id=user_id, reply_to=reply_to, headers=headers or {}))


def _refusal(guard: ReplyGuard, request: AbstractIncomingMessage) -> Any:
    return guard.refusal(guard.client_user(request.user_id, request.headers or {}),
                         request.reply_to, request.user_id)


def test_reply_guard_rules() -> None:
    guard = ReplyGuard(Names("llm"), worker_user="worker", trusted_users=frozenset({"ops"}))
    ok = [
        _request("app", "llm.reply.app"),
        _request("app", "llm.reply.app.proc-1"),
        _request(None, "llm.reply.anyone"),  # require_user_id is off
        _request("worker", "llm.reply.whatever"),  # the worker's own (single-user setup)
        _request("worker", "llm.reply.app.1", {p.H_USER: "app"}),  # back from a retry tier
        _request("ops", "llm.reply.app", {p.H_USER: b"app"}),  # an operator's replay
        # A trusted publisher for a client (the HTTP gateway) answered on its own queue:
        _request("ops", "llm.reply.ops.gw-1", {p.H_USER: "tenant-a"}),
    ]
    for request in ok:
        assert _refusal(guard, request) is None, request
    forged = [
        _request("app", "llm.reply.other"),
        _request("app", "llm.reply.appx"),  # a name that merely starts like app's
        _request("app", "llm.reply.app."),  # no suffix after the dot
        _request("app", "llm.work.chat"),
        _request("app", "llm.reply.other", {p.H_USER: "other"}),  # clients cannot vouch
        _request("worker", "llm.reply.other", {p.H_USER: "app"}),
        # ... but never on someone else's (a replayed forged request stays refused):
        _request("ops", "llm.reply.victim", {p.H_USER: "attacker"}),
    ]
    for request in forged:
        failure = _refusal(guard, request)
        assert failure is not None and failure.reason is p.ParkReason.FORGED_REPLY_TO, request
    strict = ReplyGuard(Names("llm"), worker_user="worker", require_user_id=True)
    failure = _refusal(strict, _request(None, "llm.reply.app"))
    assert failure is not None and failure.reason is p.ParkReason.NO_USER_ID
    assert guard.client_user("app", {p.H_USER: "other"}) == "app"
    assert guard.client_user("worker", {p.H_USER: "app"}) == "app"
    assert guard.client_user(None, {p.H_USER: "app"}) is None


# -- what the broker refuses a client -------------------------------------------------------


async def test_client_permissions_hold_on_the_broker(make_settings: SettingsFactory,
                                                     make_user: UserMaker) -> None:
    settings = make_settings()
    names = Names(settings.prefix)
    await apply_topology(settings)
    a = await make_user("a")
    b = await make_user("b")
    b_queue = names.reply_queue(b.name)
    async with HutchClient(b.amqp_url, client_id=b.name, prefix=settings.prefix), \
            connect(a.amqp_url) as conn:
        # What A may do: its own reply queues (several processes), publish requests.
        channel = await conn.channel(publisher_confirms=True)
        own = await channel.declare_queue(names.reply_queue(a.name), durable=True)
        await own.consume(Collector())
        await channel.declare_queue(names.reply_queue(f"{a.name}.proc-2"), exclusive=True)
        await publish(channel, names.requests_exchange, "mock-small",
                      json.dumps(body()).encode(), user_id=a.name,
                      reply_to=names.reply_queue(a.name), correlation_id="allowed")
        # Another client's replies: not to consume, get, purge or delete.
        assert "ACCESS_REFUSED" in await refused(
            conn, lambda ch: _consume(ch, b_queue))
        await refused(conn, lambda ch: _get(ch, b_queue))
        await refused(conn, lambda ch: _purge(ch, b_queue))
        await refused(conn, lambda ch: ch.queue_delete(b_queue))
        # Nor declare queues outside its pattern (B's, or a name only starting like its own).
        await refused(conn, lambda ch: ch.declare_queue(b_queue + ".mine", durable=True))
        await refused(conn, lambda ch: ch.declare_queue(names.reply_queue(a.name) + "x",
                                                        durable=True))
        await refused(conn, lambda ch: ch.declare_queue(f"{settings.prefix}.sneaky",
                                                        durable=True))
        # Nor bind its queue to the request exchange to read everyone's requests.
        await refused(conn, lambda ch: _bind(ch, names.reply_queue(a.name),
                                             names.requests_exchange))
        # Nor read work, triage or parked requests.
        for internal in (names.work_queue("chat"), names.triage_queue, names.parked_queue):
            await refused(conn, lambda ch, q=internal: _consume(ch, q))
        # Nor write anywhere but the request exchange: the default exchange (work queue,
        # parking lot, B's reply queue), the retry and dead-letter exchanges.
        for target in (names.work_queue("chat"), names.parked_queue, b_queue):
            assert "amq.default" in await refused(
                conn, lambda ch, t=target: publish(ch, "", t))
        for exchange in (names.retry_exchange, names.dead_letter_exchange,
                         names.unrouted_exchange):
            await refused(conn, lambda ch, e=exchange: publish(ch, e, "mock-small"))
        # Nor dead-letter its own queue into the default exchange.
        await refused(conn, lambda ch: ch.declare_queue(
            names.reply_queue(f"{a.name}.dl"), durable=True,
            arguments={"x-dead-letter-exchange": ""}))
        # Nor publish as B: the broker checks user_id against the connection's user.
        message = await refused(
            conn, lambda ch: publish(ch, names.requests_exchange, "mock-small",
                                     user_id=b.name, reply_to=b_queue),
            aiormq.exceptions.ChannelPreconditionFailed)
        assert "user_id" in message
    # Tagged users cannot use the management API (no management tag).
    base, _, _ = settings.management_api()
    async with httpx.AsyncClient(auth=(a.name, a.password), timeout=10) as http:
        assert (await http.get(f"{base}/api/overview")).status_code == 401


async def _consume(channel: AbstractChannel, name: str) -> None:
    await (await queue(channel, name)).consume(Collector())


async def _get(channel: AbstractChannel, name: str) -> None:
    await (await queue(channel, name)).get(fail=False)


async def _purge(channel: AbstractChannel, name: str) -> None:
    await (await queue(channel, name)).purge()


async def _bind(channel: AbstractChannel, name: str, exchange: str) -> None:
    await (await queue(channel, name)).bind(exchange, "mock-small")


# -- forged reply_to, end to end ------------------------------------------------------------


async def test_forged_reply_to_never_delivers_and_is_parked(
        make_settings: SettingsFactory, make_user: UserMaker, mock: MockBackend) -> None:
    admin = make_settings([("b1", mock.base_url, 4)])
    names = Names(admin.prefix)
    await apply_topology(admin)
    worker_user = await make_user("w", role="worker")
    a = await make_user("a")
    b = await make_user("b")
    a_queue, b_queue = names.reply_queue(a.name), names.reply_queue(b.name)
    worker_settings = make_settings([("b1", mock.base_url, 4)], amqp_url=worker_user.amqp_url,
                                    require_user_id=True)
    b_got, a_got = Collector(), Collector()
    async with running_worker(worker_settings), connect(b.amqp_url) as b_conn, \
            connect(a.amqp_url) as a_conn, connect(admin.amqp_url) as admin_conn:
        b_channel = await b_conn.channel()
        await (await b_channel.declare_queue(b_queue, durable=True)).consume(b_got)
        a_channel = await a_conn.channel(publisher_confirms=True)
        await (await a_channel.declare_queue(a_queue, durable=True)).consume(a_got)
        payload = json.dumps(body(content="steal this")).encode()
        forged: list[tuple[str, str, dict[str, Any]]] = [
            # (correlation id, model, extra properties)
            ("to-b", "mock-small", {"user_id": a.name}),
            ("to-b-unknown-model", "gpt-nope", {"user_id": a.name}),  # via triage
            ("to-b-forged-header", "mock-small",
             {"user_id": a.name, "headers": {p.H_USER: b.name}}),
            ("to-b-no-user-id", "mock-small", {}),
        ]
        for cid, model, props in forged:
            await publish(a_channel, names.requests_exchange, model, payload,
                          correlation_id=cid, reply_to=b_queue, **props)
        await publish(a_channel, names.requests_exchange, "mock-small", payload,
                      correlation_id="own", reply_to=a_queue, user_id=a.name)
        admin_channel = await admin_conn.channel()
        await wait_depth(admin_channel, names.parked_queue, len(forged))
        async with asyncio.timeout(10):
            while not a_got.messages:
                await asyncio.sleep(0.05)
        await asyncio.sleep(0.5)  # anything misrouted would have arrived by now
        parked = await drain_queue(admin_channel, names.parked_queue)
    assert b_got.messages == []  # nothing ever reached B's reply queue
    assert [m.correlation_id for m in a_got.messages] == ["own"]
    assert mock.stats()["served"] == 1  # forged requests never reached the backend
    reasons = {m.correlation_id: m.headers[p.H_REASON] for m in parked}
    assert reasons == {"to-b": "forged_reply_to", "to-b-unknown-model": "forged_reply_to",
                       "to-b-forged-header": "forged_reply_to", "to-b-no-user-id": "no_user_id"}
    by_id = {m.correlation_id: m for m in parked}
    # The validated publisher is recorded for operators; a client-set x-hutch-user is not.
    assert by_id["to-b-forged-header"].headers[p.H_USER] == a.name
    assert by_id["to-b"].headers[p.H_USER] == a.name
    assert p.H_USER not in by_id["to-b-no-user-id"].headers
    assert b_queue in str(by_id["to-b"].headers[p.H_ERROR_MESSAGE])
    assert all(m.reply_to == b_queue for m in parked)  # kept as sent, for inspection


# -- least privilege, end to end ---------------------------------------------------------------


async def test_least_privilege_client_and_worker_end_to_end(
        make_settings: SettingsFactory, make_user: UserMaker) -> None:
    """A worker user and client users serve requests, including trips through a retry
    tier, an unknown model (triage) and a terminal failure (parking lot)."""
    pool = {"attempts_per_delivery": 1, "max_attempts": 2, "retry_delays_ms": [100]}
    # The first three calls fail: request 1 fails twice (retry tier, then parked),
    # request 2 fails once and is served on its trip back from the retry tier.
    async with MockBackend(MockConfig(latency_ms=10, capacity=4, fail_first=3)) as mock:
        admin = make_settings([("b1", mock.base_url, 2)], pool=pool)
        names = Names(admin.prefix)
        await apply_topology(admin)
        worker_user = await make_user("worker", role="worker")
        app = await make_user("app")
        worker_settings = make_settings([("b1", mock.base_url, 2)], pool=pool,
                                        amqp_url=worker_user.amqp_url, require_user_id=True)
        async with connect(admin.amqp_url) as admin_conn:
            # A spy on the retry exchange sees what the worker sends to the 100 ms tier.
            spy_channel = await admin_conn.channel()
            spy = await spy_channel.declare_queue(exclusive=True)
            await spy.bind(names.retry_exchange, arguments={
                "x-match": "all", p.H_RETRY_TIER: "100"})
            async with running_worker(worker_settings), \
                    HutchClient(app.amqp_url, client_id=app.name, prefix=admin.prefix) as one, \
                    HutchClient(app.amqp_url, client_id=f"{app.name}.proc-2",
                                prefix=admin.prefix) as two:
                with pytest.raises(BackendError):
                    await one.chat(model="mock-small", timeout=20,
                                   messages=[{"role": "user", "content": "fails twice"}])
                retried = await one.request(body(content="fails once"), model="mock-small",
                                            timeout=20)
                with pytest.raises(UnknownModelError):
                    await two.chat(model="gpt-nope", timeout=20,
                                   messages=[{"role": "user", "content": "hi"}])
                replies = await asyncio.gather(*(
                    client.request(body(content=f"r{i}"), model="mock-small", timeout=20)
                    for i in range(6) for client in (one, two)))
            parked = await drain_queue(await admin_conn.channel(), names.parked_queue)
            trips = await drain_queue(spy_channel, spy.name)
    assert retried.headers[p.H_ATTEMPTS] == 2
    assert retried.completion.choices[0].message.content == "mock reply to: fails once"
    assert len(replies) == 12 and all(r.headers[p.H_OUTCOME] == "ok" for r in replies)
    assert one.dropped_replies == two.dropped_replies == 0
    # The worker sent each retry as itself (broker-checked) on the client's behalf.
    assert len(trips) == 2
    assert {m.user_id for m in trips} == {worker_user.name}
    assert {m.headers[p.H_USER] for m in trips} == {app.name}
    # The parked copies name the client even after a trip through the retry tier.
    reasons = sorted((m.headers[p.H_REASON], m.headers[p.H_USER]) for m in parked)
    assert reasons == [("backend_error", app.name), ("unknown_model", app.name)]


# -- list and remove ---------------------------------------------------------------------------


async def test_add_list_remove(make_settings: SettingsFactory, make_user: UserMaker) -> None:
    settings = make_settings()
    await apply_topology(settings)
    names = Names(settings.prefix)
    app = await make_user("app", password="a-given-password-123")
    worker_user = await make_user("worker", role="worker")
    assert "password" not in repr(app) and app.password not in repr(app)
    with pytest.raises(UserError, match="already exists"):
        await add_client(settings, app.name)
    listed = {u.name: u for u in await list_users(settings)}
    assert listed[app.name].role == "client" and CLIENT_TAG in listed[app.name].tags
    assert listed[app.name].permissions == client_permissions(names, app.name)
    assert listed[worker_user.name].role == "worker" and WORKER_TAG in listed[worker_user.name].tags
    assert listed[worker_user.name].permissions == worker_permissions(names)
    assert settings.amqp_user not in listed  # only Hutch users are listed
    assert [u.name for u in await list_users(settings, "worker")
            if u.name.startswith(settings.prefix)] == [worker_user.name]
    # remove deletes only Hutch users of the right role.
    with pytest.raises(UserError, match="not a Hutch client"):
        await remove_client(settings, worker_user.name)
    with pytest.raises(UserError, match="not a Hutch client"):
        await remove_client(settings, settings.amqp_user)
    with pytest.raises(UserError, match="no user"):
        await remove_client(settings, f"{settings.prefix}-nobody")
    # The given password works; removing the user closes its open connection.
    connection = await aio_pika.connect(app.amqp_url, timeout=10)
    closed = asyncio.Event()
    connection.close_callbacks.add(lambda *_: closed.set())
    await remove_client(settings, app.name)
    async with asyncio.timeout(10):
        await closed.wait()
    with pytest.raises(aiormq.exceptions.ProbableAuthenticationError):
        await aio_pika.connect(app.amqp_url, timeout=10)
    assert app.name not in {u.name for u in await list_users(settings)}
    await remove_worker_user(settings, worker_user.name)
    assert worker_user.name not in {u.name for u in await list_users(settings)}


# -- secrets --------------------------------------------------------------------------------------


class KeyedBackend:
    """An OpenAI-style backend that records the Authorization header it gets, and (like a
    careless proxy) echoes it back in its error messages."""

    def __init__(self) -> None:
        self.authorizations: list[str] = []
        self._runner: web.AppRunner | None = None
        self.base_url = ""

    async def __aenter__(self) -> KeyedBackend:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._chat)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        server = cast(Any, site)._server
        self.base_url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/v1"
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._runner is not None
        await self._runner.cleanup()

    async def _chat(self, request: web.Request) -> web.Response:
        auth = request.headers.get("Authorization", "")
        self.authorizations.append(auth)
        data = await request.json()
        content = data["messages"][-1]["content"]
        echo = {"error": {"message": f"upstream rejected header Authorization: {auth}"}}
        if content == "echo-500":
            return web.json_response(echo, status=500)
        if content == "echo-401":
            return web.json_response(echo, status=401)
        return web.json_response({
            "id": uuid.uuid4().hex, "object": "chat.completion", "created": int(time.time()),
            "model": data["model"],
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "fine"},
                         "finish_reason": "stop"}]})


@contextlib.contextmanager
def captured_logs() -> Iterator[io.StringIO]:
    """The worker's log lines exactly as `hutch worker --log-level DEBUG` writes them."""
    root = logging.getLogger()
    saved = (root.handlers[:], root.level, logging.Formatter.converter,
             {name: logging.getLogger(name).level for name in ("aiormq", "aio_pika", "httpx")})
    stream = io.StringIO()
    real_stderr = sys.stderr
    sys.stderr = stream
    try:
        configure_logging("DEBUG")
    finally:
        sys.stderr = real_stderr
    try:
        yield stream
    finally:
        root.handlers[:], root.level = saved[0], saved[1]
        logging.Formatter.converter = saved[2]
        for name, level in saved[3].items():
            logging.getLogger(name).setLevel(level)


async def test_api_key_appears_nowhere(make_settings: SettingsFactory,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    key = f"sk-hutch-{secrets.token_hex(16)}"
    monkeypatch.setenv("HUTCH_TEST_BACKEND_KEY", key)
    async with KeyedBackend() as backend:
        settings = make_settings(
            pool={"attempts_per_delivery": 1, "max_attempts": 2, "retry_delays_ms": [50],
                  "backends": [{"name": f"{make_settings().prefix}-keyed",
                                "url": backend.base_url, "max_concurrency": 2,
                                "timeout_s": 10, "api_key_env": "HUTCH_TEST_BACKEND_KEY"}]})
        names = Names(settings.prefix)
        metrics = Metrics()
        await apply_topology(settings)
        replies: list[AbstractIncomingMessage] = []
        with captured_logs() as logs:
            async with running_worker(settings, metrics=metrics), \
                    connect(settings.amqp_url) as conn:
                channel = await conn.channel(publisher_confirms=True)
                reply_queue = await channel.declare_queue(
                    names.reply_queue(f"{settings.prefix}-keys"), exclusive=True)
                collector = Collector()
                await reply_queue.consume(collector)
                spy = await channel.declare_queue(exclusive=True)
                await spy.bind(names.retry_exchange, arguments={"x-match": "any",
                                                                p.H_RETRY_TIER: "50"})
                for content in ("ok", "echo-500", "echo-401"):
                    await publish(channel, names.requests_exchange, "mock-small",
                                  json.dumps(body(content=content)).encode(),
                                  correlation_id=content, reply_to=reply_queue.name,
                                  content_type="application/json")
                async with asyncio.timeout(20):
                    while len(collector.messages) < 3:
                        await asyncio.sleep(0.05)
                replies = collector.messages
                parked = await drain_queue(channel, names.parked_queue, at_least=2)
                retried = await drain_queue(channel, spy.name)
        exposition = generate_latest(metrics.registry).decode()
    # The key was really sent, as a bearer token, on every call.
    assert backend.authorizations and set(backend.authorizations) == {f"Bearer {key}"}
    outcome = {m.correlation_id: m.headers[p.H_OUTCOME] for m in replies}
    assert outcome == {"ok": "ok", "echo-500": "error", "echo-401": "error"}
    assert len(parked) == 2 and len(retried) == 1
    errors = {m.correlation_id: json.loads(m.body)["error"]["message"] for m in replies
              if m.correlation_id != "ok"}
    assert all("***" in message for message in errors.values())  # redacted, not dropped
    places: dict[str, str] = {
        "logs": logs.getvalue(),
        "metrics": exposition,
    }
    for kind, messages in (("reply", replies), ("parked", parked), ("retried", retried)):
        for m in messages:
            places[f"{kind} {m.correlation_id} body"] = m.body.decode(errors="replace")
            places[f"{kind} {m.correlation_id} headers"] = repr(m.headers)
            places[f"{kind} {m.correlation_id} properties"] = repr(m.info())
    assert "request.parked" in places["logs"]  # the capture did see the worker's lines
    for where, text in places.items():
        assert key not in text, f"the API key leaked into {where}"
