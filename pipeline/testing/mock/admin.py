"""The mock's operator endpoints: stats, faults, and the realistic engine's metrics and
run-time capacity switch (``/metrics`` and ``/admin/capacity`` exist only with an engine).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from aiohttp import web

from pipeline.testing.mock.chat import error_response
from pipeline.testing.mock.engine_metrics import CONTENT_TYPE

if TYPE_CHECKING:
    from pipeline.testing.mock.server import MockBackend

__all__ = ["add_admin_routes"]


def add_admin_routes(app: web.Application, mock: MockBackend) -> None:
    """``GET /stats``, ``POST /stats/reset``, ``GET``/``POST /faults`` and, with the
    realistic engine, ``GET /metrics`` and ``GET``/``POST /admin/capacity``."""

    async def stats(request: web.Request) -> web.Response:
        return web.json_response(mock.stats())

    async def stats_reset(request: web.Request) -> web.Response:
        mock.reset_stats()
        return web.json_response(mock.stats())

    async def faults_get(request: web.Request) -> web.Response:
        return web.json_response(mock.faults())

    async def faults_set(request: web.Request) -> web.Response:
        return await _apply_object(
            request, mock.set_faults,
            "request body must be a JSON object of fault fields ({} clears all faults)")

    app.router.add_get("/stats", stats)
    app.router.add_post("/stats/reset", stats_reset)
    app.router.add_get("/faults", faults_get)
    app.router.add_post("/faults", faults_set)
    engine = mock.engine
    if engine is None:
        return

    async def metrics(request: web.Request) -> web.Response:
        return web.Response(body=engine.metrics.render(), headers={"Content-Type": CONTENT_TYPE})

    async def capacity_get(request: web.Request) -> web.Response:
        return web.json_response(engine.config.capacity())

    async def capacity_set(request: web.Request) -> web.Response:
        return await _apply_object(
            request, mock.set_capacity,
            'request body must be a JSON object such as {"kv_tokens": 2048, "max_running": 8}')

    app.router.add_get("/metrics", metrics)
    app.router.add_get("/admin/capacity", capacity_get)
    app.router.add_post("/admin/capacity", capacity_set)


async def _apply_object(request: web.Request, apply: Callable[..., dict[str, Any]],
                        not_object: str) -> web.Response:
    """Call ``apply`` with the fields of a JSON object body; 400 on a bad body or value."""
    try:
        body = json.loads(await request.read())
    except ValueError:
        return error_response(400, "invalid_request", "request body is not valid JSON")
    if not isinstance(body, dict):
        return error_response(400, "invalid_request", not_object)
    try:
        return web.json_response(apply(**body))
    except (TypeError, ValueError) as exc:
        return error_response(400, "invalid_request", str(exc))
