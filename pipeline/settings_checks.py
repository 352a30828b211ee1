"""Checks across a configuration's pools that no single field can make.

Called by :class:`pipeline.settings.Settings`' validator; the messages name the bad key.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit

__all__ = ["check_amqp_url", "check_limits", "check_names", "http_url"]


def check_names(pools: Sequence[Any]) -> None:
    """Pool and backend names are unique, and a model routes to exactly one pool."""
    seen_pools: set[str] = set()
    seen_backends: dict[str, str] = {}
    seen_models: dict[str, str] = {}
    for i, pool in enumerate(pools):
        if pool.name in seen_pools:
            raise ValueError(f"pools.{i}.name: pool {pool.name!r} is defined twice")
        seen_pools.add(pool.name)
        for model in pool.models:
            if model in seen_models:
                raise ValueError(
                    f"pools.{i}.models: model {model!r} is already served by pool "
                    f"{seen_models[model]!r}; a model routes to exactly one pool"
                )
            seen_models[model] = pool.name
        for j, backend in enumerate(pool.backends):
            if backend.name in seen_backends:
                raise ValueError(
                    f"pools.{i}.backends.{j}.name: backend {backend.name!r} is already "
                    f"defined in pool {seen_backends[backend.name]!r}; backend names "
                    "name leases and must be unique"
                )
            seen_backends[backend.name] = pool.name


def check_limits(floor: int, start: int | None, ceiling: int) -> None:
    """An adaptive limit's floor, start and ceiling (``max_concurrency``) are in order."""
    if floor > ceiling:
        raise ValueError(f"min_concurrency: {floor} is above max_concurrency ({ceiling})")
    if start is not None and not floor <= start <= ceiling:
        raise ValueError(f"start_concurrency: {start} is outside min_concurrency .. "
                         f"max_concurrency ({floor} .. {ceiling})")


def http_url(value: str, example: str) -> str:
    """``value`` if it is an http(s) URL with a host."""
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"must be an http(s) URL such as {example}")
    return value


def check_amqp_url(value: str) -> str:
    parts = urlsplit(value)
    if parts.scheme not in ("amqp", "amqps") or not parts.hostname:
        raise ValueError("must be an amqp:// or amqps:// URL with a host")
    return value
