"""One gateway replica: its broker client, its HTTP server, its metrics.

A replica is stateless: it owns one reply queue (``<prefix>.reply.<its broker user>.<replica
id>``, durable, gone ``reply_queue_expires_s`` after the replica is) and holds every waiting
HTTP request in memory only, so any number of replicas run behind a load balancer. It
publishes as its own broker user, which the workers must trust (``trusted_users``): they
then believe the ``x-hutch-user`` header it sets to the API key's identity, and let it name
its own reply queue. An ordinary client cannot set that header for itself: the worker
believes it from trusted users only.

The HTTP server is aiohttp's (the project already depends on aiohttp; see the README for the
measurement against uvicorn). Slow clients cannot stall it: a request's headers are bounded
in size, a connection that sends no complete request is closed after ``idle_timeout_s``,
and a body must arrive within ``body_timeout_s``. Whatever goes wrong, the answer has
OpenAI's error shape: router errors, requests aiohttp refuses (:mod:`.badhttp`), and any
unexpected error (a 500 and one log line naming its class and where it was raised).

API keys are reloaded without a restart (:mod:`.keywatch`): ``keys_file`` is watched, and
:meth:`GatewayServer.reload_keys` (SIGHUP in ``hutch gateway``) re-reads it at once.
"""

from __future__ import annotations

import asyncio
import os
import socket
import sys
import traceback
import uuid
from collections.abc import Awaitable, Callable
from types import TracebackType

from aiohttp import web
from prometheus_client import start_http_server

from pipeline.client.client import HutchClient
from pipeline.errors import RequestFailed
from pipeline.gateway.app import Gateway
from pipeline.gateway.auth import KeyRing
from pipeline.gateway.badhttp import GatewayRunner
from pipeline.gateway.calls import CallReader, refusal
from pipeline.gateway.keywatch import KeyWatcher
from pipeline.gateway.metrics import GatewayMetrics
from pipeline.gateway.responses import error_response
from pipeline.observe.log import get_logger
from pipeline.scheduling.tenants import TenantBook
from pipeline.settings import Settings

__all__ = ["GatewayServer", "default_replica_id"]

log = get_logger("hutch.gateway")

_Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def default_replica_id() -> str:
    """``<host>-<pid>-<random>``: unique per process."""
    host = socket.gethostname().replace(".", "-")
    return f"{host}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


@web.middleware
async def _openai_errors(request: web.Request, handler: _Handler) -> web.StreamResponse:
    """Router errors (an unknown path, a wrong method) in OpenAI's error shape."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status, "invalid_request")
        error = refusal(exc.status, f"{request.method} {request.path}: {exc.reason}",
                        code=code)
        return error_response(error, correlation_id=None, retry_after_s=0)
    except RequestFailed as exc:
        return error_response(exc, correlation_id=None, retry_after_s=0)
    except ConnectionError:
        raise  # the client is gone: aiohttp closes the connection
    except Exception as exc:  # a bug: answer 500 as OpenAI would, log where, not what
        frame = traceback.extract_tb(exc.__traceback__)[-1]
        log.error("gateway.unexpected_error", error=type(exc).__name__,
                  where=f"{os.path.basename(frame.filename)}:{frame.lineno}",
                  path=request.path)
        error = refusal(500, "the gateway failed to answer this request",
                        code="internal_error", type="api_error")
        return error_response(error, correlation_id=None, retry_after_s=0)


class GatewayServer:
    """A running replica; ``async with`` or ``start()``/``stop()``."""

    def __init__(self, settings: Settings, *, host: str | None = None,
                 port: int | None = None, replica_id: str | None = None,
                 metrics: GatewayMetrics | None = None) -> None:
        self.settings = settings
        gateway = settings.gateway
        self.host = host if host is not None else gateway.host
        self._port = port if port is not None else gateway.port
        self.replica_id = replica_id or default_replica_id()
        self.metrics = metrics or GatewayMetrics()
        self.keys = KeyRing(gateway)  # a key_env that is not set fails here, at start
        self.metrics.known_clients(self.keys.identities())
        self._watcher = KeyWatcher(self.keys, gateway.keys_file, gateway.keys_reload_s,
                                   self._reloaded)
        self._watching: asyncio.Task[None] | None = None
        self.client = HutchClient.from_settings(
            settings, client_id=f"{settings.amqp_user}.{self.replica_id}",
            reply_queue_expires_s=gateway.reply_queue_expires_s,
            default_timeout_s=gateway.default_timeout_s)
        self._runner: web.AppRunner | None = None

    @property
    def models(self) -> list[str]:
        return [model for pool in self.settings.pools for model in pool.models]

    @property
    def port(self) -> int:
        return self._port

    @property
    def base_url(self) -> str:
        """The OpenAI ``base_url`` of this replica (ends in ``/v1``)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/v1"

    def _app(self) -> web.Application:
        gateway = self.settings.gateway
        reader = CallReader(gateway, self.keys, max_body_bytes=self.settings.max_body_bytes,
                            models=self.models,
                            auth_failed=lambda reason: self.metrics.auth_failures.labels(
                                reason).inc(),
                            tenants=TenantBook(self.settings.tenants))
        app = web.Application(client_max_size=self.settings.max_body_bytes,
                              middlewares=[_openai_errors])
        Gateway(self.client, reader, self.metrics, models=self.models,
                retry_after_s=gateway.retry_after_s).routes(app)
        return app

    async def start(self) -> None:
        """Connect to the broker (its errors are raised), then listen."""
        if self.keys.open:
            self._warn_open()
        await self.client.connect()
        runner = GatewayRunner(self._app(), access_log=None, handler_cancellation=True,
                               keepalive_timeout=self.settings.gateway.idle_timeout_s,
                               max_line_size=8190, max_field_size=8190, max_headers=100)
        await runner.setup()
        try:
            site = web.TCPSite(runner, self.host, self._port, backlog=1024)
            await site.start()
            self._port = int(runner.addresses[0][1])
        except BaseException:
            await runner.cleanup()
            await self.client.close()
            raise
        self._runner = runner
        self._watching = asyncio.create_task(self._watcher.run())
        log.info("gateway.listening", url=self.base_url, replica=self.replica_id,
                 reply_queue=self.client.reply_queue_name, open_mode=self.keys.open,
                 clients=self.keys.identities())

    def reload_keys(self) -> bool:
        """Re-read the API keys now (``hutch gateway`` does on SIGHUP); False if they did
        not load (the keys in force stay, the error is logged)."""
        return self._watcher.reload("asked")

    def _reloaded(self, ok: bool) -> None:
        self.metrics.key_reloads.labels("ok" if ok else "error").inc()
        if ok:
            self.metrics.known_clients(self.keys.identities())

    def _warn_open(self) -> None:
        identity = self.settings.gateway.open_identity
        message = (f"hutch gateway: OPEN DEVELOPMENT MODE: no [gateway] keys are configured, "
                   f"so every caller is accepted without an API key as {identity!r}. "
                   "Configure [[gateway.keys]] before exposing it.")
        print(message, file=sys.stderr, flush=True)
        log.warning("gateway.open_mode", identity=identity)

    def serve_metrics(self, port: int, addr: str = "0.0.0.0") -> int:
        """Expose ``/metrics`` (a daemon thread); the port bound."""
        server, _thread = start_http_server(port, addr=addr, registry=self.metrics.registry)
        return int(server.server_port)

    async def stop(self) -> None:
        """Stop listening (requests in progress get a short grace), then disconnect."""
        runner, self._runner = self._runner, None
        watching, self._watching = self._watching, None
        if watching is not None:
            watching.cancel()
            await asyncio.gather(watching, return_exceptions=True)
        if runner is not None:
            await runner.cleanup()
        await self.client.close()

    async def __aenter__(self) -> GatewayServer:
        await self.start()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.stop()
