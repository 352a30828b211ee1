"""RabbitMQ nodes of a benchmark's own, beside the user's broker (scripts/rabbitmq-node).

The ``cluster`` scenario kills a node under load, so it never uses the broker it was
pointed at: it starts nodes of its own from the installed RabbitMQ server with the script
the tests use (scripts/rabbitmq-node: every path, port and name its own, state under
``$HUTCH_NODES_DIR/hutch-b<pid>-<label>``), and deletes them when it ends. The names carry
the owning process's pid, so nodes left by a run that was itself killed are deleted by
the next run. The script ships in this package (``hutch_bench/nodes/``: package data, a
link to scripts/rabbitmq-node in a source checkout), so it runs from a wheel too; it needs
the RabbitMQ server (Debian: ``apt-get install rabbitmq-server``).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from pipeline.broker.management import ManagementAPI
from pipeline.errors import StackError

__all__ = ["SCRIPT", "BenchNode", "BenchNodes", "KillAt", "free_ports"]

SCRIPT = Path(__file__).resolve().parent / "nodes" / "rabbitmq-node"
NODES_DIR = Path(os.environ.get("HUTCH_NODES_DIR", "/tmp/hutch-nodes"))
#: The script's exit code when the RabbitMQ server is not installed.
_MISSING = 127
#: Ports RabbitMQ uses on its own: the main node's and the CLI tools' distribution ports.
_RESERVED = {4369, 5671, 5672, 15671, 15672, 25672, *range(35672, 35683)}
_PREFIX = "hutch-b"


def free_ports(count: int) -> list[int]:
    """``count`` distinct ports nothing listens on now, none of RabbitMQ's own."""
    with contextlib.ExitStack() as held:  # held together, so the kernel hands out distinct
        ports: list[int] = []
        while len(ports) < count:
            sock = held.enter_context(socket.socket())
            sock.bind(("127.0.0.1", 0))
            port: int = sock.getsockname()[1]
            if port not in _RESERVED:
                ports.append(port)
        return ports


async def _script(*args: str, timeout_s: float = 60) -> str:
    """Run scripts/rabbitmq-node; its failures become :class:`StackError` quoting it."""
    if not SCRIPT.is_file():
        raise StackError(f"{SCRIPT} not found: the cluster scenario starts RabbitMQ nodes "
                         "with it; reinstall hutch (the script is its package data)")
    process = await asyncio.create_subprocess_exec(
        "bash", str(SCRIPT), *args, stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        async with asyncio.timeout(timeout_s):
            out, err = await process.communicate()
    except TimeoutError:
        raise StackError(f"rabbitmq-node {' '.join(args[:2])}: no answer after "
                         f"{timeout_s:g}s") from None
    finally:
        if process.returncode is None:  # timed out or interrupted: leave nothing running
            process.kill()
            await process.wait()
    text = err.decode(errors="replace").strip() or out.decode(errors="replace").strip()
    if process.returncode == _MISSING:
        raise StackError("the cluster scenario runs RabbitMQ nodes of its own (it kills one) "
                         f"and cannot start one: {text}")
    if process.returncode != 0:
        raise StackError(f"rabbitmq-node {' '.join(args)} failed ({process.returncode}): "
                         f"{text}")
    return out.decode(errors="replace")


@dataclass(frozen=True)
class BenchNode:
    """One node: AMQP and the management API on 127.0.0.1, guest/guest, vhost ``/``."""

    name: str
    amqp_port: int
    mgmt_port: int
    dist_port: int

    @property
    def nodename(self) -> str:
        return f"{self.name}@localhost"

    @property
    def amqp_url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.amqp_port}/"

    @property
    def management_url(self) -> str:
        return f"http://127.0.0.1:{self.mgmt_port}"

    async def start(self, timeout_s: float) -> None:
        """Start the node; return once RabbitMQ has booted."""
        await _script("start", self.name, "--amqp-port", str(self.amqp_port),
                      "--mgmt-port", str(self.mgmt_port), "--dist-port", str(self.dist_port),
                      "--timeout", str(int(timeout_s)), timeout_s=timeout_s + 30)

    async def join(self, first: BenchNode) -> None:
        await _script("join", self.name, first.name, timeout_s=180)

    async def kill(self) -> None:
        """kill -9 of the node's Erlang VM (a crash). The signal goes out before this
        returns when the VM's pid file is there (the usual case): the caller's clock
        reading right after is the moment of the kill, not a script's start-up later."""
        try:
            pid = int((NODES_DIR / self.name / "node.pid").read_text().strip())
        except (OSError, ValueError):
            await _script("kill", self.name)
            return
        os.kill(pid, signal.SIGKILL)

    async def clean(self) -> None:
        """Kill the node if it runs and delete its state (idempotent)."""
        await _script("clean", self.name)

    async def ctl(self, *args: str, timeout_s: float = 60) -> str:
        """Any rabbitmqctl command against this node (``eval`` included); its output."""
        return await _script("ctl", self.name, *args, timeout_s=timeout_s)

    async def version(self) -> str | None:
        """The node's RabbitMQ version (None if its management API does not say)."""
        with contextlib.suppress(Exception):
            async with ManagementAPI(self.management_url, "guest", "guest") as api:
                return str((await api.overview())["rabbitmq_version"])
        return None


class KillAt:
    """kill -9 of ``node`` ``at_s`` into a load: :meth:`arm` is the load's ``on_start``,
    :meth:`moment` the seconds from that start to the kill."""

    def __init__(self, node: BenchNode, at_s: float) -> None:
        self.node, self.at_s = node, at_s
        self.task: asyncio.Task[float] | None = None

    async def arm(self) -> None:
        loop = asyncio.get_running_loop()
        origin = loop.time()  # the load's clock starts right after this returns

        async def later() -> float:
            await asyncio.sleep(self.at_s)
            await self.node.kill()
            return loop.time() - origin

        self.task = asyncio.create_task(later())

    async def moment(self) -> float:
        if self.task is None:
            raise StackError("the kill was never armed (the load did not start)")
        return await self.task

    def cancel(self) -> None:
        """Call off a kill that has not happened (the load failed first)."""
        if self.task is not None and not self.task.done():
            self.task.cancel()


def _orphans() -> list[str]:
    """Nodes of benchmark runs whose process is gone (killed before cleaning up)."""
    if not NODES_DIR.is_dir():
        return []
    found = []
    for path in NODES_DIR.glob(f"{_PREFIX}*-*"):
        owner = path.name.split("-")[1].removeprefix("b")
        if owner.isdigit() and not Path(f"/proc/{owner}").exists():
            found.append(path.name)
    return found


class BenchNodes:
    """A standalone node and a cluster of ``size`` nodes, started side by side (the joins
    are one after another), all deleted on exit.

    ``async with BenchNodes() as nodes:`` then ``nodes.single`` and ``nodes.cluster``.
    """

    def __init__(self, size: int = 3, *, timeout_s: float = 150,
                 standalone: bool = True) -> None:
        ports = free_ports(3 * (size + 1))
        label = f"{_PREFIX}{os.getpid()}"
        self.single = BenchNode(f"{label}-single", *ports[:3])
        self.cluster = [BenchNode(f"{label}-c{i}", *ports[3 * i:3 * i + 3])
                        for i in range(1, size + 1)]
        self.timeout_s = timeout_s
        #: False: the standalone node is never started (a run that needs the cluster only).
        self.standalone = standalone

    @property
    def all(self) -> list[BenchNode]:
        return [self.single, *self.cluster] if self.standalone else list(self.cluster)

    async def __aenter__(self) -> BenchNodes:
        for name in _orphans():
            with contextlib.suppress(StackError):
                await _script("clean", name)
        try:
            # Every start runs to its end (a failed one does not leave the others
            # booting while the nodes are cleaned), then the first failure is raised.
            started = await asyncio.gather(*(node.start(self.timeout_s) for node in self.all),
                                           return_exceptions=True)
            for result in started:
                if isinstance(result, BaseException):
                    raise result
            for node in self.cluster[1:]:
                await node.join(self.cluster[0])
        except BaseException:
            await self.clean()
            raise
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.clean()

    async def clean(self) -> None:
        results = await asyncio.gather(*(node.clean() for node in self.all),
                                       return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException) and not isinstance(result, StackError):
                raise result

    def node_named(self, nodename: str) -> BenchNode:
        for node in self.all:
            if node.nodename == nodename:
                return node
        raise StackError(f"no node of this run is named {nodename!r}")
