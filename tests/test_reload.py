"""Config reloads: the diff (pure), then each kind of change on a worker under light load
against the real broker and mock backends: every request answered exactly once, a new
cap respected, a new URL used, a removed backend drained, an error changing nothing."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiormq
import pytest

from pipeline.broker.names import Names
from pipeline.broker.topology import apply_topology
from pipeline.client.client import HutchClient
from pipeline.observe.metrics import Metrics
from pipeline.ops.status import format_status, status
from pipeline.ops.worker_configs import disagreements, read_worker_configs
from pipeline.runtime.background import running
from pipeline.settings import Settings
from pipeline.testing.mock import MockBackend, MockConfig
from pipeline.worker.cap_claims import Claim, ClaimBook
from pipeline.worker.config_diff import (
    accepting,
    config_hash,
    diff_settings,
    moved_models,
    url_hash,
)
from pipeline.worker.reload import Reloader, ReloadResult
from pipeline.worker.reload_stamp import ConfigStamp
from pipeline.worker.reload_topology import needs_of
from pipeline.worker.worker import Worker
from tests.conftest import (
    HUTCH,
    SettingsFactory,
    amqp,
    body,
    running_worker,
    wait_for,
    write_config,
)
from tests.test_security import UserMaker, make_user  # noqa: F401  (fixture)

# -- the diff ---------------------------------------------------------------------------


def _two_pools(make_settings: SettingsFactory, **pool: Any) -> Settings:
    base = make_settings([("b1", "http://127.0.0.1:9001/v1", 4),
                          ("b2", "http://127.0.0.1:9002/v1", 2)], pool=pool)
    return base


def test_identical_settings_differ_in_nothing(make_settings: SettingsFactory) -> None:
    old = _two_pools(make_settings)
    diff = diff_settings(old, _two_pools(make_settings))
    assert diff.empty and not diff.restart
    assert config_hash(old) == config_hash(_two_pools(make_settings))


def test_recap_and_repoint_are_told_apart(make_settings: SettingsFactory,
                                          prefix: str) -> None:
    old = _two_pools(make_settings)
    new = make_settings([("b1", "http://127.0.0.1:9001/v1", 8),
                         ("b2", "http://127.0.0.1:9999/v1", 2)])
    diff = diff_settings(old, new)
    kinds = {(c.kind, c.name) for c in diff.backends}
    assert kinds == {("recapped", f"{prefix}-b1"), ("repointed", f"{prefix}-b2")}
    assert not diff.pools and not diff.restart
    lines = diff.describe()
    assert {"change": "backend.recapped", "pool": "chat", "backend": f"{prefix}-b1",
            "max_concurrency": "4 -> 8"} in lines
    repointed = next(line for line in lines if line["change"] == "backend.repointed")
    assert repointed["url"] == (f"{url_hash('http://127.0.0.1:9002/v1')} -> "
                                f"{url_hash('http://127.0.0.1:9999/v1')}")
    assert "9999" not in str(lines)  # URLs only as hashes


def test_added_and_removed_backends(make_settings: SettingsFactory, prefix: str) -> None:
    old = _two_pools(make_settings)
    new = make_settings([("b2", "http://127.0.0.1:9002/v1", 2),
                         ("b3", "http://127.0.0.1:9003/v1", 1)])
    diff = diff_settings(old, new)
    assert [(c.kind, c.name) for c in diff.of_backends("added")] == [("added", f"{prefix}-b3")]
    assert [c.name for c in diff.of_backends("removed")] == [f"{prefix}-b1"]


def test_pool_added_and_models_moved(make_settings: SettingsFactory, prefix: str) -> None:
    old = make_settings([("b1", "http://127.0.0.1:9001/v1", 4)])
    new = _with_code_pool(make_settings, old, "http://127.0.0.1:9005/v1")
    diff = diff_settings(old, new)
    assert [(c.kind, c.name) for c in diff.pools] == [("added", "code"), ("changed", "chat")]
    assert diff.of_pools("changed")[0].fields == ("models",)
    assert [c.name for c in diff.of_backends("added")] == [f"{prefix}-c1"]
    needs = needs_of(old, new, diff)
    names = Names(prefix)
    assert names.work_queue("code") in needs.queues
    assert names.pool_workers_queue("code") in needs.queues
    assert needs.bindings == (("mock-large", names.work_queue("code")),)


def test_a_model_moving_between_kept_pools_is_accepted_by_both_until_apply(
        make_settings: SettingsFactory) -> None:
    chat = {"name": "chat", "models": ["m1", "m2"],
            "backends": [{"name": "b1", "url": "http://127.0.0.1:9001/v1",
                          "max_concurrency": 1}]}
    code = {"name": "code", "models": ["m3"],
            "backends": [{"name": "c1", "url": "http://127.0.0.1:9002/v1",
                          "max_concurrency": 1}]}
    old = make_settings(pools=[chat, code])
    new = make_settings(pools=[{**chat, "models": ["m1"]}, {**code, "models": ["m3", "m2"]}])
    moved = moved_models(old, new)
    assert moved == {"chat": ["m2"]}
    served = accepting(new, moved)
    assert served.pool("chat").models == ["m1", "m2"] and served.pool("code").models == [
        "m3", "m2"]
    assert needs_of(old, new, diff_settings(old, new)).bindings == ()  # apply comes after
    assert accepting(new, {}) is new


def test_keys_a_running_worker_keeps_need_a_restart(make_settings: SettingsFactory,
                                                    prefix: str) -> None:
    old = _two_pools(make_settings)
    cases = {
        "prefix": make_settings(prefix="other"),
        "pools.chat.queue_type": _two_pools(make_settings, queue_type="quorum"),
        "pools.chat.breaker_failures": _two_pools(make_settings, breaker_failures=9),
        "heartbeat_s": _two_pools(make_settings).model_copy(update={"heartbeat_s": 30}),
    }
    backend = old.pools[0].backends[0]
    adaptive = old.model_copy(update={"pools": [old.pools[0].model_copy(update={
        "backends": [backend.model_copy(update={"concurrency": "adaptive"}),
                     *old.pools[0].backends[1:]]}), *old.pools[1:]]})
    cases[f"pools.chat.backends.{backend.name}.concurrency"] = adaptive
    for key, new in cases.items():
        diff = diff_settings(old, new)
        assert any(line.startswith(key) for line in diff.restart), (key, diff.restart)
    # a backend changing pools keeps its lease's name: never held twice by one worker
    moved = old.model_copy(update={"pools": [
        old.pools[0].model_copy(update={"backends": old.pools[0].backends[1:]}),
        old.pools[0].model_copy(update={"name": "code", "models": ["other"],
                                        "backends": old.pools[0].backends[:1]})]})
    assert any(f"backends.{prefix}-b1: moves" in line
               for line in diff_settings(old, moved).restart)


def test_broker_only_keys_change_nothing_in_the_worker(make_settings: SettingsFactory
                                                       ) -> None:
    old = _two_pools(make_settings)
    diff = diff_settings(old, _two_pools(make_settings, max_queue_length=7))
    assert diff.empty and diff.broker_only == ("pools.chat.max_queue_length",)


def test_stamp_round_trips_through_consumer_arguments(make_settings: SettingsFactory,
                                                      prefix: str) -> None:
    settings = _two_pools(make_settings)
    stamp = ConfigStamp.of(settings)
    parsed = ConfigStamp.parse(stamp.arguments())
    assert parsed is not None and parsed.hash == config_hash(settings)
    assert parsed.backends[f"{prefix}-b1"] == [4, url_hash("http://127.0.0.1:9001/v1")]
    assert stamp.next(settings).generation == 2
    assert ConfigStamp.parse({"x-hutch-config": "{not json"}) is None
    assert ConfigStamp.parse(None) is None


def _with_code_pool(make_settings: SettingsFactory, old: Settings, url: str) -> Settings:
    """``old`` with mock-large moved from pool chat to a new pool code (backend c1)."""
    code = {"name": "code", "models": ["mock-large"],
            "backends": [{"name": f"{old.prefix}-c1", "url": url, "max_concurrency": 2,
                          "timeout_s": 10}]}
    chat = old.pools[0].model_dump(mode="json")
    chat["models"] = ["mock-small"]
    return make_settings(pools=[chat, code])


# -- a worker under load ------------------------------------------------------------------


@contextlib.asynccontextmanager
async def serving(settings: Settings, config: Path) -> AsyncIterator[
        tuple[Worker, Reloader, HutchClient]]:
    """Topology applied, a worker running ``settings`` (read from ``config`` on reload),
    a client."""
    write_config(config, settings)
    await apply_topology(settings)
    async with running_worker(settings, metrics=Metrics()) as worker:
        client = HutchClient.from_settings(settings)
        async with client:
            yield worker, Reloader(worker, config), client


async def _load(client: HutchClient, n: int, model: str = "mock-small"
                ) -> list[asyncio.Task[Any]]:
    """``n`` requests sent at once, as tasks (each resolves to its reply)."""
    return [asyncio.create_task(client.request(body(model, f"r{i}"), model=model,
                                               timeout=60)) for i in range(n)]


def _served(*mocks: MockBackend) -> int:
    return sum(int(m.stats()["served"]) for m in mocks)


async def _reload(reloader: Reloader, config: Path, settings: Settings) -> ReloadResult:
    write_config(config, settings)
    return await reloader.reload()


def _reloads(worker: Worker, result: str) -> float:
    value = worker.metrics.registry.get_sample_value(
        "hutch_config_reloads_total", {"result": result})
    return value or 0.0


async def test_recap_under_load_holds_the_new_cap(make_settings: SettingsFactory,
                                                  tmp_path: Path) -> None:
    async with MockBackend(MockConfig(latency_ms=150, capacity=16)) as mock:
        settings = make_settings([("b1", mock.base_url, 6)])
        config = tmp_path / "hutch.toml"
        async with serving(settings, config) as (worker, reloader, client):
            first = await _load(client, 24)
            await wait_for(lambda: _async(mock.stats()["in_service"] > 0))
            result = await _reload(reloader, config, make_settings([("b1", mock.base_url, 2)]))
            assert result.result == "applied", result.reason
            assert [c["change"] for c in result.changes] == ["backend.recapped"]
            replies = await asyncio.gather(*first)
            # what ran at the reload finished; from now on two at a time
            mock.reset_stats()
            replies += await asyncio.gather(*await _load(client, 12))
            assert mock.stats()["max_concurrency"] <= 2
            assert worker.stamp.generation == 2
            assert _reloads(worker, "applied") == 1
            # hutch status shows the new generation (once the API's statistics refresh)
            async with asyncio.timeout(30):
                while [(c.generation, c.hash) for c in await read_worker_configs(settings)
                       ] != [(2, worker.stamp.hash)]:
                    await asyncio.sleep(0.5)
    assert len(replies) == 36 and all(r.headers["x-hutch-outcome"] == "ok" for r in replies)
    assert len({r.correlation_id for r in replies}) == 36


async def _async(value: bool) -> bool:
    return value


async def test_repoint_sends_new_requests_to_the_new_url(make_settings: SettingsFactory,
                                                         tmp_path: Path) -> None:
    async with MockBackend(MockConfig(latency_ms=200, capacity=8)) as old_mock, \
            MockBackend(MockConfig(latency_ms=20, capacity=8)) as new_mock:
        settings = make_settings([("b1", old_mock.base_url, 4)])
        config = tmp_path / "hutch.toml"
        async with serving(settings, config) as (_, reloader, client):
            first = await _load(client, 8)
            await wait_for(lambda: _async(old_mock.stats()["max_concurrency"] > 0))
            result = await _reload(reloader, config,
                                   make_settings([("b1", new_mock.base_url, 4)]))
            assert result.result == "applied", result.reason
            assert [c["change"] for c in result.changes] == ["backend.repointed"]
            replies = await asyncio.gather(*first)
            old_served = _served(old_mock)
            replies += await asyncio.gather(*await _load(client, 10))
            assert _served(old_mock) == old_served  # nothing new went to the old URL
            assert _served(new_mock) >= 10
    assert _served(old_mock, new_mock) == len(replies) == 18
    assert all(r.headers["x-hutch-outcome"] == "ok" for r in replies)


async def test_added_backend_serves_and_removed_one_drains(make_settings: SettingsFactory,
                                                           tmp_path: Path,
                                                           prefix: str) -> None:
    async with MockBackend(MockConfig(latency_ms=300, capacity=8)) as one, \
            MockBackend(MockConfig(latency_ms=20, capacity=8)) as two:
        settings = make_settings([("b1", one.base_url, 2)])
        config = tmp_path / "hutch.toml"
        async with serving(settings, config) as (worker, reloader, client):
            first = await _load(client, 6)
            await wait_for(lambda: _async(one.stats()["max_concurrency"] > 0))
            result = await _reload(reloader, config, make_settings([("b2", two.base_url, 2)]))
            assert result.result == "applied", result.reason
            assert sorted(str(c["change"]) for c in result.changes) == ["backend.added",
                                                                   "backend.removed"]
            replies = await asyncio.gather(*first)
            await asyncio.wait_for(asyncio.gather(*result.retiring), 30)
            assert worker.held_backends() == [f"{prefix}-b2"]
            before = _served(one)
            replies += await asyncio.gather(*await _load(client, 8))
            assert _served(one) == before  # the removed backend took nothing new
            async with amqp(settings.amqp_url) as connection:
                channel = await connection.channel()
                with pytest.raises(aiormq.exceptions.ChannelNotFoundEntity):  # lease gone
                    await channel.declare_queue(Names(prefix).lease_queue(f"{prefix}-b1"),
                                                passive=True)
    assert _served(one, two) == len(replies) == 14
    assert one.stats()["aborted"] == 0  # what ran on the removed backend finished there
    assert all(r.headers["x-hutch-outcome"] == "ok" for r in replies)
    assert {r.backend for r in replies[-8:]} == {f"{prefix}-b2"}


async def test_new_pool_is_refused_until_applied(make_settings: SettingsFactory,
                                                 tmp_path: Path, prefix: str) -> None:
    async with MockBackend(MockConfig(latency_ms=20, capacity=8)) as chat, \
            MockBackend(MockConfig(latency_ms=20, capacity=8)) as code:
        settings = make_settings([("b1", chat.base_url, 2)])
        config = tmp_path / "hutch.toml"
        new = _with_code_pool(make_settings, settings, code.base_url)
        async with serving(settings, config) as (worker, reloader, client):
            refused = await _reload(reloader, config, new)
            assert refused.result == "refused"
            assert Names(prefix).work_queue("code") in refused.reason
            assert "hutch topology apply" in refused.reason
            assert worker.stamp.generation == 1 and worker.settings == settings
            assert _reloads(worker, "refused") == 1
            await apply_topology(new)
            applied = await reloader.reload()
            assert applied.result == "applied", applied.reason
            await wait_for(lambda: _async(f"{prefix}-c1" in worker.held_backends()), 20)
            large = await client.request(body("mock-large"), model="mock-large", timeout=30)
            small = await client.request(body("mock-small"), model="mock-small", timeout=30)
    assert large.headers["x-hutch-pool"] == "code" and large.backend == f"{prefix}-c1"
    assert small.headers["x-hutch-pool"] == "chat"


async def test_a_reload_with_an_error_changes_nothing(make_settings: SettingsFactory,
                                                      tmp_path: Path, mock: MockBackend
                                                      ) -> None:
    settings = make_settings([("b1", mock.base_url, 2)])
    config = tmp_path / "hutch.toml"
    async with serving(settings, config) as (worker, reloader, client):
        config.write_text("this is [not toml")
        broken = await reloader.reload()
        text = config.read_text()
        write_config(config, settings)
        config.write_text(config.read_text().replace("max_concurrency = 2",
                                                      "max_concurrency = 0"))
        invalid = await reloader.reload()
        restart = await _reload(reloader, config, settings.model_copy(
            update={"heartbeat_s": 30}))
        reply = await client.request(body(), model="mock-small", timeout=30)
        assert worker.stamp.generation == 1 and worker.settings == settings
        assert _reloads(worker, "invalid") == 2 and _reloads(worker, "refused") == 1
    assert text == "this is [not toml"
    assert broken.result == "invalid" and str(config) in broken.reason
    assert invalid.result == "invalid" and "max_concurrency" in invalid.reason
    assert restart.result == "refused" and "heartbeat_s" in restart.reason
    assert reply.headers["x-hutch-outcome"] == "ok"


# -- workers that disagree ----------------------------------------------------------------


def test_claim_book_holds_the_lowest_fresh_cap_and_reports_each_change_once() -> None:
    now = [0.0]
    book = ClaimBook(fresh_for_s=10, clock=lambda: now[0])
    assert book.cap("b1", 4) == 4 and book.new_disagreement("b1", 4, "u1") is None
    book.record("b1", Claim("w2", 2, "u1"))
    assert book.cap("b1", 4) == 2
    assert book.new_disagreement("b1", 4, "u1") == [Claim("w2", 2, "u1")]
    assert book.new_disagreement("b1", 4, "u1") is None  # logged once
    book.record("b1", Claim("w3", 8, "u9"))  # a higher cap never raises it; a URL differs
    assert book.cap("b1", 4) == 2
    assert book.new_disagreement("b1", 4, "u1") == [Claim("w2", 2, "u1"),
                                                     Claim("w3", 8, "u9")]
    now[0] = 11.0  # the claims expire (their workers left, or reloaded and stopped)
    assert book.cap("b1", 4) == 4 and book.new_disagreement("b1", 4, "u1") == []


async def test_two_workers_disagreeing_are_reported_and_the_lower_cap_holds(
        make_settings: SettingsFactory, prefix: str) -> None:
    async with MockBackend(MockConfig(latency_ms=100, capacity=16)) as mock:
        loose = make_settings([("b1", mock.base_url, 6)])
        strict = make_settings([("b1", mock.base_url, 2)])
        backend = f"{prefix}-b1"
        await apply_topology(loose)
        async with running_worker(loose, metrics=Metrics()) as holder:
            other = Worker(strict, metrics=Metrics())
            async with running(other.run(), ready=lambda: other.ready.is_set(),
                               stop=other.stop, stop_timeout_s=20):
                slot = holder.slots.named(backend)
                await wait_for(lambda: _async(slot.holder.health.max_concurrency == 2), 30)
                async with HutchClient.from_settings(loose) as client:
                    await asyncio.sleep(0.5)  # what ran at the old cap has ended
                    mock.reset_stats()
                    replies = await asyncio.gather(*await _load(client, 12))
                assert mock.stats()["max_concurrency"] <= 2
                assert holder.held_backends() == [backend]
                # the management API lists consumers from its statistics (every ~5 s)
                async with asyncio.timeout(30):
                    while len((report := await status(loose, [])).configs) < 2:
                        await asyncio.sleep(0.5)
        assert all(r.headers["x-hutch-outcome"] == "ok" for r in replies)
    found = disagreements(report.configs)
    assert [(d.backend, d.what) for d in found] == [(backend, "max_concurrency")]
    assert sorted(found[0].values) == ["2", "6"]
    text = format_status(report)
    assert f"backend {backend}: workers disagree about its max_concurrency" in text
    assert "1 worker(s) run another config than this file" in text


# -- the command: SIGHUP and --watch-config -------------------------------------------------


def _events(log: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]


async def _log_line(log: Path, event: str, timeout: float = 30, **fields: Any
                    ) -> dict[str, Any]:
    """The first JSON log line of ``event`` (with ``fields``) the worker wrote."""
    async with asyncio.timeout(timeout):
        while True:
            for line in _events(log):
                if line.get("event") == event and fields.items() <= line.items():
                    return line
            await asyncio.sleep(0.1)


async def test_the_worker_command_reloads_on_sighup_and_on_a_file_change(
        make_settings: SettingsFactory, tmp_path: Path, mock: MockBackend,
        hutch_env: dict[str, str]) -> None:
    settings = make_settings([("b1", mock.base_url, 2)])
    config = write_config(tmp_path / "hutch.toml", settings)
    await apply_topology(settings)
    log = tmp_path / "worker.log"
    with log.open("w") as stderr:
        proc = await asyncio.create_subprocess_exec(
            *HUTCH, "worker", "--config", str(config), "--watch-config", "0.2",
            env=hutch_env, stdout=asyncio.subprocess.DEVNULL, stderr=stderr)
    try:
        await _log_line(log, "worker.ready")
        write_config(config, make_settings([("b1", mock.base_url, 3)]))  # the watch sees it
        reloaded = await _log_line(log, "config.reloaded")
        change = await _log_line(log, "config.change")
        config.write_text("not = [toml")
        await _log_line(log, "config.reload_failed")  # the watch again: an invalid file
        write_config(config, make_settings([("b1", mock.base_url, 3)]))
        proc.send_signal(signal.SIGHUP)  # unchanged now: said so
        await _log_line(log, "config.reloaded", result="unchanged")
    finally:
        proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(proc.wait(), 30)
    assert reloaded["result"] == "applied" and reloaded["generation"] == 2
    assert change["change"] == "backend.recapped" and change["max_concurrency"] == "2 -> 3"
    failed = await _log_line(log, "config.reload_failed")
    assert failed["result"] == "invalid" and str(config) in failed["reason"]
    assert failed["running_generation"] == 2
    assert proc.returncode == 0


async def test_a_model_moves_between_pools_without_a_refused_request(
        make_settings: SettingsFactory, tmp_path: Path, prefix: str) -> None:
    """Between two pools the worker serves: reload first (the old pool keeps accepting the
    model the broker still routes to it), then ``topology apply`` moves the binding."""
    async with MockBackend(MockConfig(latency_ms=20, capacity=8,
                                      models=("mock-small", "mock-large", "mock-code"))
                           ) as mock:
        chat = {"name": "chat", "models": ["mock-small", "mock-large"],
                "backends": [{"name": f"{prefix}-b1", "url": mock.base_url,
                              "max_concurrency": 2, "timeout_s": 10}]}
        code = {"name": "code", "models": ["mock-code"],
                "backends": [{"name": f"{prefix}-c1", "url": mock.base_url,
                              "max_concurrency": 2, "timeout_s": 10}]}
        settings = make_settings(pools=[chat, code])
        moved = make_settings(pools=[{**chat, "models": ["mock-small"]},
                                     {**code, "models": ["mock-code", "mock-large"]}])
        config = tmp_path / "hutch.toml"
        async with serving(settings, config) as (worker, reloader, client):
            result = await _reload(reloader, config, moved)
            assert result.result == "applied", result.reason
            before = await client.request(body("mock-large"), model="mock-large", timeout=30)
            await apply_topology(moved)
            after = await client.request(body("mock-large"), model="mock-large", timeout=30)
            assert worker.settings == moved
    assert before.headers["x-hutch-outcome"] == "ok" and before.headers["x-hutch-pool"] == "chat"
    assert after.headers["x-hutch-outcome"] == "ok" and after.headers["x-hutch-pool"] == "code"


async def test_a_removed_pool_drains_and_the_worker_leaves_it(
        make_settings: SettingsFactory, tmp_path: Path, prefix: str) -> None:
    async with MockBackend(MockConfig(latency_ms=200, capacity=8,
                                      models=("mock-small", "mock-code"))) as mock:
        chat = {"name": "chat", "models": ["mock-small"],
                "backends": [{"name": f"{prefix}-b1", "url": mock.base_url,
                              "max_concurrency": 2, "timeout_s": 10}]}
        code = {"name": "code", "models": ["mock-code"],
                "backends": [{"name": f"{prefix}-c1", "url": mock.base_url,
                              "max_concurrency": 2, "timeout_s": 10}]}
        settings = make_settings(pools=[chat, code])
        config = tmp_path / "hutch.toml"
        async with serving(settings, config) as (worker, reloader, client):
            # as many as its cap, all running: queued ones would wait for a worker of the
            # pool that nobody serves any more (docs: drain a pool before removing it)
            first = await _load(client, 2, model="mock-code")
            await wait_for(lambda: _async(mock.stats()["in_service"] == 2))
            result = await _reload(reloader, config, make_settings(pools=[chat]))
            assert result.result == "applied", result.reason
            assert {str(c["change"]) for c in result.changes} == {"pool.removed",
                                                                  "backend.removed"}
            replies = await asyncio.gather(*first)
            await asyncio.wait_for(asyncio.gather(*result.retiring), 30)
            assert worker.held_backends() == [f"{prefix}-b1"]
            async with amqp(settings.amqp_url) as connection:
                channel = await connection.channel()
                presence = await channel.declare_queue(
                    Names(prefix).pool_workers_queue("code"), passive=True)
            assert presence.declaration_result.consumer_count == 0
    assert all(r.headers["x-hutch-outcome"] == "ok" for r in replies)
    assert mock.stats()["aborted"] == 0 and mock.stats()["served"] == 2


async def test_a_model_added_without_its_binding_is_refused(
        make_settings: SettingsFactory, tmp_path: Path, mock: MockBackend,
        prefix: str) -> None:
    settings = make_settings([("b1", mock.base_url, 2)])
    config = tmp_path / "hutch.toml"
    more = make_settings([("b1", mock.base_url, 2)],
                         pool={"models": ["mock-small", "mock-large", "mock-extra"]})
    async with serving(settings, config) as (worker, reloader, _):
        refused = await _reload(reloader, config, more)
        await apply_topology(more)
        applied = await reloader.reload()
        assert worker.settings == more
    assert refused.result == "refused"
    assert f"binding {prefix}.requests --mock-extra--> {prefix}.work.chat" in refused.reason
    assert applied.result == "applied"
    assert applied.changes == [{"change": "pool.changed", "pool": "chat", "fields": ["models"],
                                "models": ["mock-small", "mock-large", "mock-extra"]}]


async def test_cap_claims_work_with_least_privilege_worker_users(
        make_settings: SettingsFactory, make_user: UserMaker,  # noqa: F811
        prefix: str) -> None:
    """The claims need only what `hutch worker-user add` grants (publish through the
    default exchange, read a lease queue)."""
    admin = make_settings([("b1", "http://127.0.0.1:9/v1", 6)])
    await apply_topology(admin)
    user = await make_user("worker", role="worker")
    loose = make_settings([("b1", "http://127.0.0.1:9/v1", 6)], amqp_url=user.amqp_url)
    strict = make_settings([("b1", "http://127.0.0.1:9/v1", 3)], amqp_url=user.amqp_url)
    async with running_worker(loose, metrics=Metrics()) as holder:
        other = Worker(strict, metrics=Metrics())
        async with running(other.run(), ready=lambda: other.ready.is_set(),
                           stop=other.stop, stop_timeout_s=20):
            health = holder.slots.named(f"{prefix}-b1").holder.health
            await wait_for(lambda: _async(health.max_concurrency == 3), 30)
        # the other worker left: its claims expire and the configured cap is back
        await wait_for(lambda: _async(health.max_concurrency == 6), 60)
