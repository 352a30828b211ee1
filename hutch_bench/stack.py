"""What a benchmark scenario runs besides the load: mock backends and workers as child
processes, under a topology of their own.

Child processes, not tasks in the benchmark's event loop: that is how Hutch runs, and a
worker sharing a loop (and a core) with the load generator would measure the generator.
Every child writes to a log file in the stack's directory (a pipe nobody reads would
block it), is stopped with SIGTERM (then SIGKILL) when the stack closes, and the topology,
reply queues included, is deleted, so an interrupted run leaves nothing behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import signal
import socket
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import httpx

from pipeline.broker.connection import connect_url
from pipeline.broker.management import ManagementAPI
from pipeline.broker.names import Names
from pipeline.broker.topology import apply_topology, delete_topology
from pipeline.errors import StackError, TopologyError
from pipeline.settings import Settings, dump_toml, load_settings

__all__ = [
    "BROKER_KEYS",
    "Child",
    "MockProcess",
    "Stack",
    "check_broker",
    "free_port",
    "on_broker",
    "until_http",
]

_READY_TIMEOUT_S = 20.0
#: The keys of the user's configuration, besides ``amqp_url``, that a stack on that broker
#: carries into its settings (and its children's): the management API and TLS files.
BROKER_KEYS = ("management_url", "tls_ca_file", "tls_cert_file", "tls_key_file")
#: The user's broker (``amqp_url`` and :data:`BROKER_KEYS`) while a scenario runs.
_BROKER: ContextVar[dict[str, Any] | None] = ContextVar("hutch_bench_broker", default=None)
_MANAGEMENT_HINT = (
    "With only HUTCH_AMQP_URL set, the management API is looked for on port 15672 (15671 "
    "for amqps) of its host: set HUTCH_MANAGEMENT_URL (or management_url in -c FILE) to "
    "the API of that broker.")


async def check_broker(settings: Settings) -> None:
    """Before a scenario starts anything on the user's broker: its management API (which
    applies and deletes the scenario's topology) must belong to that broker."""
    try:
        async with ManagementAPI.from_settings(settings) as api:
            await api.check_same_broker()
    except TopologyError as exc:
        hint = "" if "HUTCH_MANAGEMENT_URL" in str(exc) else " " + _MANAGEMENT_HINT
        raise TopologyError(f"{str(exc).rstrip('.')}.{hint}") from None


@contextlib.contextmanager
def on_broker(settings: Settings) -> Iterator[None]:
    """Stacks on ``settings.amqp_url`` (the user's broker) use its :data:`BROKER_KEYS`
    too, from the configuration file as much as from the environment."""
    keys = {key: getattr(settings, key) for key in BROKER_KEYS if getattr(settings, key)}
    token = _BROKER.set({"amqp_url": settings.amqp_url, **keys})
    try:
        yield
    finally:
        _BROKER.reset(token)

T = TypeVar("T")


def _proc_status(pid: int, field: str) -> float | None:
    """A ``/proc/<pid>/status`` memory field (VmRSS, VmHWM) in MiB; None if unreadable."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    match = re.search(rf"^{field}:\s+(\d+) kB", text, re.MULTILINE)
    return int(match[1]) / 1024 if match else None


async def _wait_until(check: Callable[[], Awaitable[T | None]], children: Sequence[Child],
                      what: str, timeout_s: float, interval_s: float) -> T:
    """Poll ``check`` until it gives a value; fail at once if one of ``children`` exits
    (quoting its log), or after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        found = await check()
        if found is not None:
            return found
        for child in children:
            if child.process.returncode is not None:
                raise StackError(f"{child.name} exited with {child.process.returncode} "
                                 f"before {what}:\n{child.log_tail()}")
        if time.monotonic() > deadline:
            tails = "".join(f"\n--- {c.name}:\n{c.log_tail(5)}" for c in children)
            raise StackError(f"no {what} after {timeout_s:g}s{tails}")
        await asyncio.sleep(interval_s)


def free_port() -> int:
    """A port on 127.0.0.1 nothing listens on now (for a child to bind)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def until_http(child: Child, url: str, timeout_s: float) -> None:
    """Wait until ``url`` answers 200 (``child`` serves it); fail at once if it exits."""
    async with httpx.AsyncClient(timeout=2) as http:

        async def answers() -> bool | None:
            with contextlib.suppress(httpx.HTTPError, OSError):
                return (await http.get(url)).status_code == 200 or None
            return None

        await _wait_until(answers, [child], f"answer from {url}", timeout_s, 0.2)


@dataclass
class Child:
    """One child process and its log file."""

    name: str
    process: asyncio.subprocess.Process
    log_path: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def rss_mib(self) -> float | None:
        """Resident memory now (Linux ``/proc``; None elsewhere or once it exited)."""
        return _proc_status(self.pid, "VmRSS")

    def peak_rss_mib(self) -> float | None:
        """The kernel's high-water mark of resident memory (VmHWM) since the start."""
        return _proc_status(self.pid, "VmHWM")

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    async def wait_for_line(self, pattern: str, timeout_s: float = _READY_TIMEOUT_S
                            ) -> re.Match[str]:
        """Wait until the log has a line matching ``pattern``; fail early if it exits."""
        regex = re.compile(pattern)

        async def matched() -> re.Match[str] | None:
            lines = self.log_path.read_text(errors="replace").splitlines()
            return next((m for m in map(regex.search, lines) if m), None)

        return await _wait_until(matched, [self], f"{self.name} ready", timeout_s, 0.05)

    async def stop(self, grace_s: float = 15.0) -> int:
        """SIGTERM, wait up to ``grace_s`` (workers drain in-flight work), then SIGKILL."""
        if self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(signal.SIGTERM)
            try:
                async with asyncio.timeout(grace_s):
                    await self.process.wait()
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    self.process.kill()
                await self.process.wait()
        assert self.process.returncode is not None
        return self.process.returncode


@dataclass
class MockProcess(Child):
    """A ``hutch mock-backend`` child: its ``url`` (``.../v1``) and its ``/stats``."""

    url: str = ""

    async def stats(self) -> dict[str, Any]:
        stats_url = self.url.removesuffix("/v1") + "/stats"
        async with httpx.AsyncClient(timeout=10) as http:
            response = await http.get(stats_url)
            response.raise_for_status()
            data: dict[str, Any] = response.json()
            return data

    async def reset(self) -> None:
        reset_url = self.url.removesuffix("/v1") + "/stats/reset"
        async with httpx.AsyncClient(timeout=10) as http:
            (await http.post(reset_url)).raise_for_status()


class Stack:
    """Children and a topology under ``prefix``, all undone on exit.

    ``async with Stack(amqp_url) as stack:`` then :meth:`mock`, :meth:`settings`,
    :meth:`apply`, :meth:`worker`, :meth:`wait_for_consumers`; the reply queues of the
    client ids added to ``client_ids`` are deleted with the topology.
    """

    def __init__(self, amqp_url: str, *, prefix: str | None = None,
                 keep_logs: bool = False) -> None:
        self.amqp_url = amqp_url
        self.prefix = prefix or f"hutch-bench-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.names = Names(self.prefix)
        self.dir = Path(tempfile.mkdtemp(prefix=f"{self.prefix}-"))
        self.keep_logs = keep_logs
        self.children: list[Child] = []
        self.client_ids: list[str] = []
        #: Further queues to delete on close (a baseline's work queue).
        self.queues: list[str] = []
        self._applied: list[Settings] = []

    async def __aenter__(self) -> Stack:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.close()

    async def close(self) -> None:
        # Workers first (they drain into the mock), then the mocks.
        for child in sorted(self.children, key=lambda c: isinstance(c, MockProcess)):
            await child.stop()
        self.children.clear()
        for settings in self._applied:
            with contextlib.suppress(Exception):
                await delete_topology(settings, reply_queues=self.client_ids)
        self._applied.clear()
        if self.queues:
            with contextlib.suppress(Exception):
                connection = await connect_url(self.amqp_url, name="hutch bench")
                async with connection:
                    channel = await connection.channel()
                    for queue in self.queues:
                        await channel.queue_delete(queue)
        self.queues.clear()
        if not self.keep_logs:
            shutil.rmtree(self.dir, ignore_errors=True)

    async def spawn(self, name: str, module: str, args: Sequence[str]) -> Child:
        """Start ``python -m module args`` as a child logging to ``<dir>/<name>.log``."""
        log_path = self.dir / f"{name}.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith("HUTCH_")}
        env["PYTHONUNBUFFERED"] = "1"
        with log_path.open("wb") as log:
            process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", module, *args, stdin=asyncio.subprocess.DEVNULL,
                stdout=log, stderr=asyncio.subprocess.STDOUT, env=env)
        child = Child(name, process, log_path)
        self.children.append(child)
        return child

    async def mock(self, *, capacity: int, latency_ms: float,
                   models: Sequence[str] = ("mock-small",),
                   extra: Sequence[str] = ()) -> MockProcess:
        """Start ``hutch mock-backend`` on a free port; return once it listens.
        ``extra``: more of its options (a streaming scenario's pace)."""
        name = f"mock-{sum(c.name.startswith('mock-') for c in self.children) + 1}"
        child = await self.spawn(name, "pipeline.cli.main", [
            "mock-backend", "--port", "0", "--capacity", str(capacity),
            "--latency-ms", f"{latency_ms:g}", "--models", ",".join(models), *extra])
        mock = MockProcess(child.name, child.process, child.log_path)
        self.children[self.children.index(child)] = mock
        match = await mock.wait_for_line(r"listening on (\S+)")
        mock.url = match[1]
        return mock

    def settings(self, pools: list[dict[str, Any]], **overrides: Any) -> Settings:
        """Validated settings under this stack's prefix (on the user's broker, with its
        management API and TLS files: :func:`on_broker`)."""
        broker = _BROKER.get() or {}
        keys = broker if broker.get("amqp_url") == self.amqp_url else {}
        return load_settings(**{**keys, "amqp_url": self.amqp_url, "prefix": self.prefix,
                                "pools": pools, **overrides})

    async def apply(self, settings: Settings) -> None:
        await apply_topology(settings)
        self._applied.append(settings)

    async def worker(self, settings: Settings, *, log_level: str = "WARNING",
                     loop: str = "asyncio", extra: Sequence[str] = ()) -> Child:
        """Start ``hutch worker`` with these settings (written to a file only we read);
        ``extra``: more of its options (``--metrics-port``)."""
        index = sum(c.name.startswith("worker-") for c in self.children) + 1
        config = self.dir / f"worker-{index}.toml"
        config.touch(mode=0o600)
        config.write_text(dump_toml(settings))
        return await self.spawn(f"worker-{index}", "pipeline.cli.main",
                                ["worker", "-c", str(config), "--log-level", log_level,
                                 "--loop", loop, *extra])

    async def wait_for_consumers(self, queue: str, count: int,
                                 timeout_s: float = _READY_TIMEOUT_S) -> None:
        """Wait until ``queue`` has ``count`` consumers: a worker consumes its pool's queue
        only once it holds a backend's lease, so this is "ready to serve"."""
        connection = await connect_url(self.amqp_url, name="hutch bench")
        async with connection:
            channel = await connection.channel()

            async def enough() -> bool | None:
                declared = await channel.declare_queue(queue, passive=True)
                return (declared.declaration_result.consumer_count or 0) >= count or None

            await _wait_until(enough, self.children, f"{count} consumer(s) on {queue}",
                              timeout_s, 0.1)
