"""Checks across a configuration's pools that no single field can make.

Called by :class:`pipeline.settings.Settings`' validator; the messages name the bad key.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = ["check_names"]


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
