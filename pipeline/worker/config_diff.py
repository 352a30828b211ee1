"""What a config reload changes, computed before anything is touched.

A running worker compares the settings it runs with and a newly read file
(:mod:`pipeline.worker.reload`). The comparison is pure, so every case is unit-tested:

* per backend: ``added``, ``removed``, ``recapped`` (``max_concurrency``) or
  ``repointed`` (``url``, ``timeout_s``, ``api_key_env``, ``send_priority``: a new HTTP
  client for new requests); a backend both recapped and repointed is one change of each;
* per pool: ``added``, ``removed``, or ``changed`` in what the worker reads per request
  (``models``, ``max_attempts``, ``attempts_per_delivery``, ``retry_delays_ms``);
  broker-side settings (``max_queue_length``, ``message_ttl_ms``, ``delivery_limit``) are
  for ``hutch topology apply`` and change nothing in the worker;
* ``restart``: the keys a running worker cannot change (connection, prefix, tenants, a
  pool's ``queue_type``, ``scheduling`` or breaker, a backend's ``throttle_scope`` or a
  backend moving to another pool). A diff with any of them is refused whole.

:func:`config_hash` names a configuration in logs, presence and ``hutch status``;
:func:`url_hash` names a backend's URL without showing it (it may hold credentials).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Literal

from pipeline.settings import BackendSettings, PoolSettings, Settings

__all__ = [
    "BackendChange",
    "ConfigDiff",
    "PoolChange",
    "accepting",
    "config_hash",
    "diff_settings",
    "moved_models",
    "url_hash",
]

BackendKind = Literal["added", "removed", "recapped", "repointed"]
PoolKind = Literal["added", "removed", "changed"]

#: Backend fields a new HTTP client picks up (the rest: the cap, or a restart).
_REPOINT_FIELDS = ("url", "timeout_s", "api_key_env", "send_priority", "metrics_url")
#: Backend fields built into its limit (fixed or adaptive, its floor and start).
_LIMIT_FIELDS = ("concurrency", "min_concurrency", "start_concurrency")
#: Pool fields the worker reads per request (its dispatcher): changed live.
_POOL_LIVE_FIELDS = ("models", "max_attempts", "attempts_per_delivery", "retry_delays_ms")
#: Pool fields only the broker's policy holds: ``hutch topology apply``, not the worker.
_POOL_BROKER_FIELDS = ("max_queue_length", "message_ttl_ms", "delivery_limit")
#: Pool fields built into running parts (queues' type, admission, breakers): a restart.
_POOL_RESTART_FIELDS = ("queue_type", "scheduling", "breaker_failures", "breaker_cooldown_s")
#: Top-level keys the worker does not use (the gateway's section).
_IGNORED_TOP = {"gateway", "pools"}


@dataclass(frozen=True)
class BackendChange:
    """One backend's change; ``old``/``new`` are None for an addition/removal."""

    kind: BackendKind
    pool: str
    name: str
    old: BackendSettings | None = None
    new: BackendSettings | None = None
    fields: tuple[str, ...] = ()

    def describe(self) -> dict[str, object]:
        """The log line's fields (URLs as hashes only)."""
        out: dict[str, object] = {"change": f"backend.{self.kind}", "pool": self.pool,
                                  "backend": self.name}
        if self.kind == "recapped" and self.old and self.new:
            out["max_concurrency"] = f"{self.old.max_concurrency} -> {self.new.max_concurrency}"
        if self.kind == "repointed" and self.old and self.new:
            out["fields"] = list(self.fields)
            out["url"] = f"{url_hash(self.old.url)} -> {url_hash(self.new.url)}"
        if self.kind == "added" and self.new:
            out["max_concurrency"] = self.new.max_concurrency
            out["url"] = url_hash(self.new.url)
        return out


@dataclass(frozen=True)
class PoolChange:
    """One pool's change; ``fields`` names what changed for ``changed``."""

    kind: PoolKind
    name: str
    new: PoolSettings | None = None
    fields: tuple[str, ...] = ()

    def describe(self) -> dict[str, object]:
        out: dict[str, object] = {"change": f"pool.{self.kind}", "pool": self.name}
        if self.fields:
            out["fields"] = list(self.fields)
        if self.new is not None and (self.kind == "added" or "models" in self.fields):
            out["models"] = list(self.new.models)
        return out


@dataclass(frozen=True)
class ConfigDiff:
    """Everything a reload would change; ``restart`` non-empty: it changes nothing."""

    pools: tuple[PoolChange, ...] = ()
    backends: tuple[BackendChange, ...] = ()
    #: Keys a running worker cannot change, each with why (``key: reason``).
    restart: tuple[str, ...] = ()
    #: Keys that changed but only ``hutch topology apply`` acts on (logged, not applied).
    broker_only: tuple[str, ...] = field(default=())

    @property
    def empty(self) -> bool:
        return not (self.pools or self.backends or self.restart)

    def of_backends(self, *kinds: BackendKind) -> list[BackendChange]:
        return [change for change in self.backends if change.kind in kinds]

    def of_pools(self, *kinds: PoolKind) -> list[PoolChange]:
        return [change for change in self.pools if change.kind in kinds]

    def describe(self) -> list[dict[str, object]]:
        """One dict per change: the reload's log lines."""
        return [*(c.describe() for c in self.pools), *(c.describe() for c in self.backends)]


def config_hash(settings: Settings) -> str:
    """A short, stable name of a configuration (what the worker acts on, not the file's
    formatting): equal settings, equal hash."""
    data = settings.model_dump(mode="json", exclude={"gateway"})
    text = json.dumps(data, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def url_hash(url: str) -> str:
    """A backend URL's short hash: comparable across workers, never shown (credentials)."""
    return hashlib.sha256(url.encode()).hexdigest()[:8]


def _changed(old: object, new: object, names: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(name for name in names if getattr(old, name) != getattr(new, name))


def _top_level(old: Settings, new: Settings) -> list[str]:
    keys = set(type(old).model_fields) - _IGNORED_TOP
    return [f"{key}: a running worker keeps its {key}" for key in sorted(keys)
            if getattr(old, key) != getattr(new, key)]


def _backend_changes(pool: str, old: PoolSettings, new: PoolSettings
                     ) -> tuple[list[BackendChange], list[str]]:
    changes: list[BackendChange] = []
    restart: list[str] = []
    before = {b.name: b for b in old.backends}
    after = {b.name: b for b in new.backends}
    for name, backend in after.items():
        was = before.get(name)
        if was is None:
            continue
        if was.throttle_scope != backend.throttle_scope:
            restart.append(f"pools.{pool}.backends.{name}.throttle_scope: built into the "
                           "backend's health")
        restart += [f"pools.{pool}.backends.{name}.{key}: built into the backend's limit"
                    for key in _changed(was, backend, _LIMIT_FIELDS)]
        if was.max_concurrency != backend.max_concurrency:
            changes.append(BackendChange("recapped", pool, name, was, backend,
                                         ("max_concurrency",)))
        moved = _changed(was, backend, _REPOINT_FIELDS)
        if moved:
            changes.append(BackendChange("repointed", pool, name, was, backend, moved))
    return changes, restart


def diff_settings(old: Settings, new: Settings) -> ConfigDiff:
    """What changes from ``old`` to ``new``, and what of it needs a restart."""
    restart = _top_level(old, new)
    broker_only: list[str] = []
    pools: list[PoolChange] = []
    backends: list[BackendChange] = []
    old_pools = {p.name: p for p in old.pools}
    new_pools = {p.name: p for p in new.pools}
    home = {b.name: p.name for p in old.pools for b in p.backends}
    for name, pool in new_pools.items():
        was = old_pools.get(name)
        if was is None:
            pools.append(PoolChange("added", name, pool))
            continue
        restart += [f"pools.{name}.{key}: built into the running pool"
                    for key in _changed(was, pool, _POOL_RESTART_FIELDS)]
        broker_only += [f"pools.{name}.{key}"
                        for key in _changed(was, pool, _POOL_BROKER_FIELDS)]
        live = _changed(was, pool, _POOL_LIVE_FIELDS)
        if live:
            pools.append(PoolChange("changed", name, pool, live))
        changed, needs = _backend_changes(name, was, pool)
        backends += changed
        restart += needs
    for name in old_pools.keys() - new_pools.keys():
        pools.append(PoolChange("removed", name))
    # Additions and removals by name, over all pools: a backend changing pools keeps its
    # lease queue's name, and one worker must never hold it twice.
    new_home = {b.name: (p.name, b) for p in new.pools for b in p.backends}
    for name, (pool_name, backend) in new_home.items():
        if name not in home:
            backends.append(BackendChange("added", pool_name, name, new=backend))
        elif home[name] != pool_name:
            restart.append(f"pools.{pool_name}.backends.{name}: moves from pool "
                           f"{home[name]!r} (its lease moves with it)")
    for name, pool_name in home.items():
        if name not in new_home:
            old_backend = next(b for b in old_pools[pool_name].backends if b.name == name)
            backends.append(BackendChange("removed", pool_name, name, old=old_backend))
    backends = _discovered_need_restart(backends, restart)
    return ConfigDiff(tuple(sorted(pools, key=lambda c: (c.kind, c.name))),
                      tuple(backends), tuple(restart), tuple(broker_only))


def _discovered_need_restart(backends: list[BackendChange], restart: list[str]
                             ) -> list[BackendChange]:
    """A backend whose replicas DNS names (``discover = "dns"``) is changed, added or
    removed by a restart: its replicas are slots of their own, not the template's."""
    kept = []
    for change in backends:
        if any(b is not None and b.discover == "dns" for b in (change.old, change.new)):
            restart.append(f"pools.{change.pool}.backends.{change.name}: its replicas are "
                           "discovered by DNS (restart the worker to change it)")
        else:
            kept.append(change)
    return kept


def moved_models(old: Settings, new: Settings) -> dict[str, list[str]]:
    """Models that move between two pools both configurations have, by the pool they
    leave. The broker routes them to that pool until ``hutch topology apply`` moves their
    binding, so a reloaded worker keeps accepting them there (:func:`accepting`)."""
    before = {model: pool.name for pool in old.pools for model in pool.models}
    kept = {pool.name for pool in old.pools} & {pool.name for pool in new.pools}
    moved: dict[str, list[str]] = {}
    for pool in new.pools:
        for model in pool.models:
            was = before.get(model)
            if pool.name in kept and was in kept and was != pool.name:
                moved.setdefault(str(was), []).append(model)
    return moved


def accepting(new: Settings, moved: dict[str, list[str]]) -> Settings:
    """``new`` as the worker's dispatchers use it: each pool also accepts the models
    moving away from it (not validated again: a model is in two pools here on purpose)."""
    if not moved:
        return new
    pools = [pool.model_copy(update={"models": [*pool.models, *moved.get(pool.name, [])]})
             for pool in new.pools]
    return new.model_copy(update={"pools": pools})
