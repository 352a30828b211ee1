"""``/healthz`` and ``/readyz`` beside ``/metrics``: what Kubernetes probes ask a worker.

- ``/healthz`` (liveness): 200 while the worker's event loop turns (a heartbeat younger
  than ``stall_s``); 503 when it stalled, so a wedged process is restarted.
- ``/readyz`` (readiness): 200 while the worker is connected and serving (its topology
  found, its consumers started); 503 with the reason while it (re)connects or drains.

Both answer from the metrics server's thread, reading state the event loop writes (a
timestamp, an event's flag): a probe never waits on the loop it checks.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Callable, Iterable
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app

__all__ = ["Check", "LoopHeartbeat", "serve_with_probes"]

#: A probe's answer: (ok, a short reason).
Check = Callable[[], tuple[bool, str]]

_StartResponse = Callable[[str, list[tuple[str, str]]], Any]


class LoopHeartbeat:
    """A timestamp the event loop refreshes every ``interval_s``: the liveness check."""

    def __init__(self, *, interval_s: float = 1.0, stall_s: float = 30.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.interval_s = interval_s
        self.stall_s = stall_s
        self._clock = clock
        self._last = clock()

    async def run(self) -> None:
        """Beat until cancelled (run it as a task on the loop it watches)."""
        while True:
            self._last = self._clock()
            await asyncio.sleep(self.interval_s)

    def check(self) -> tuple[bool, str]:
        age = self._clock() - self._last
        if age > self.stall_s:
            return False, f"event loop stalled for {age:.0f}s"
        return True, "ok"


class _Quiet(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """Probes every few seconds would flood the log."""


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _Server6(_Server):
    address_family = socket.AF_INET6


def _app(registry: CollectorRegistry, checks: dict[str, Check]
         ) -> Callable[[dict[str, Any], _StartResponse], Iterable[bytes]]:
    metrics = make_wsgi_app(registry)

    def app(environ: dict[str, Any], start_response: _StartResponse) -> Iterable[bytes]:
        check = checks.get(environ.get("PATH_INFO", ""))
        if check is None:
            return metrics(environ, start_response)  # type: ignore[no-any-return]
        ok, reason = check()
        start_response("200 OK" if ok else "503 Service Unavailable",
                       [("Content-Type", "text/plain; charset=utf-8")])
        return [f"{reason}\n".encode()]

    return app


def serve_with_probes(registry: CollectorRegistry, port: int, addr: str, *,
                      live: Check | None = None, ready: Check | None = None
                      ) -> tuple[WSGIServer, threading.Thread]:
    """``/metrics`` (any other path too, as prometheus-client serves it), and ``/healthz``
    and ``/readyz`` when given their checks, on a daemon thread."""
    checks = {path: check for path, check in (("/healthz", live), ("/readyz", ready))
              if check is not None}
    server = make_server(addr, port, _app(registry, checks),
                         _Server6 if ":" in addr else _Server, handler_class=_Quiet)
    thread = threading.Thread(target=server.serve_forever, name="hutch-metrics", daemon=True)
    thread.start()
    return server, thread
