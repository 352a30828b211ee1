"""Local RabbitMQ nodes the tests start themselves (scripts/rabbitmq-node), and certificates.

A test that stops, kills, restarts, partitions or reconfigures a broker does it to a node of
its own, never to the broker the user pointed the suite at. :class:`LocalNode` drives
``scripts/rabbitmq-node``: a node on free ports with all its state under
``/tmp/hutch-nodes/<name>``, killed when the test session ends (and, after a session that
was itself killed, by the next one: node names carry the pid of the session that owns them).

A node takes about 4 s to start on the 2-core CI machine (stop_app/start_app ~2 s, a clean
stop ~5 s): fixtures that need one are module-scoped where the tests allow it.

Without the RabbitMQ server binaries these tests fail (never skip) and say how to get them.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest

__all__ = [
    "SCRIPT",
    "LocalCluster",
    "LocalNode",
    "NodeFactory",
    "TlsFiles",
    "free_port",
    "local_cluster",
    "local_node",
    "make_certificates",
    "node_factory",
]

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "rabbitmq-node"
NODES_DIR = Path(os.environ.get("HUTCH_NODES_DIR", "/tmp/hutch-nodes"))
#: The script's exit code when the RabbitMQ server is not installed.
_MISSING = 127
#: Ports RabbitMQ uses on its own: the main node's distribution port and the CLI tools'.
_RESERVED = {4369, 5671, 5672, 15671, 15672, 25672, *range(35672, 35683)}
_handed_out: set[int] = set()
_live: dict[str, LocalNode] = {}


def free_port() -> int:
    """A port nothing listens on now, not RabbitMQ's own, not handed out before."""
    for _ in range(100):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port: int = sock.getsockname()[1]
        if port not in _RESERVED and port not in _handed_out:
            _handed_out.add(port)
            return port
    raise RuntimeError("no free port found")


class NodeError(RuntimeError):
    """scripts/rabbitmq-node failed; the message quotes its output."""


def _script(*args: str, timeout: float = 120) -> str:
    try:
        done = subprocess.run([str(SCRIPT), *args], capture_output=True, text=True,
                              timeout=timeout, check=False)
    except FileNotFoundError as exc:  # no bash
        pytest.fail(f"cannot run {SCRIPT}: {exc}", pytrace=False)
    if done.returncode == _MISSING:
        pytest.fail(
            "This test runs a RabbitMQ node of its own (it stops, kills or reconfigures it, "
            "which the suite never does to your broker), and cannot start one: "
            f"{done.stderr.strip()}", pytrace=False)
    if done.returncode != 0:
        raise NodeError(f"rabbitmq-node {' '.join(args)} failed ({done.returncode}): "
                        f"{done.stderr.strip() or done.stdout.strip()}")
    return done.stdout


@dataclass(frozen=True)
class TlsFiles:
    """A private CA, a server certificate for 127.0.0.1/localhost and a client one."""

    directory: Path
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def _openssl(*args: str, cwd: Path) -> None:
    if shutil.which("openssl") is None:
        pytest.fail("the TLS tests make their certificates with the `openssl` command, "
                    "which is missing: apt-get install openssl", pytrace=False)
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def _signed(name: str, cn: str, ca: str, cwd: Path, *extension: str) -> None:
    _openssl("req", "-new", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key",
             "-out", f"{name}.csr", "-subj", f"/CN={cn}", cwd=cwd)
    (cwd / f"{name}.ext").write_text("\n".join(extension) + "\n")
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key",
             "-CAcreateserial", "-days", "2", "-sha256", "-extfile", f"{name}.ext",
             "-out", f"{name}.pem", cwd=cwd)


def make_certificates(directory: Path) -> TlsFiles:
    """A CA and, signed by it, a server certificate (CN localhost, SAN 127.0.0.1 and
    localhost) and a client certificate (CN hutch-test), in ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-sha256",
             "-keyout", "ca.key", "-out", "ca.pem", "-subj", "/CN=hutch-test-ca", cwd=directory)
    _signed("server", "localhost", "ca", directory,
            "subjectAltName = DNS:localhost, IP:127.0.0.1", "extendedKeyUsage = serverAuth")
    _signed("client", "hutch-test", "ca", directory, "extendedKeyUsage = clientAuth")
    return TlsFiles(directory, directory / "ca.pem", directory / "server.pem",
                    directory / "server.key", directory / "client.pem", directory / "client.key")


@dataclass
class LocalNode:
    """One RabbitMQ node of the tests' own, driven by scripts/rabbitmq-node."""

    name: str
    management: bool = True
    tls: TlsFiles | None = None
    amqp_port: int = field(default_factory=free_port)
    mgmt_port: int = field(default_factory=free_port)
    dist_port: int = field(default_factory=free_port)

    @property
    def nodename(self) -> str:
        return f"{self.name}@localhost"

    def amqp_url(self, vhost: str = "/", user: str = "guest", password: str = "guest") -> str:
        """The node's AMQP URL (``amqps://`` with TLS: the host is 127.0.0.1)."""
        scheme = "amqps" if self.tls else "amqp"
        path = "" if vhost == "/" else vhost
        return f"{scheme}://{user}:{password}@127.0.0.1:{self.amqp_port}/{path}"

    @property
    def management_url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.mgmt_port}"

    def start(self, timeout_s: float = 90) -> None:
        """Start the node and wait until RabbitMQ has booted; cleaned up at session end."""
        args = ["start", self.name, "--amqp-port", str(self.amqp_port),
                "--mgmt-port", str(self.mgmt_port), "--dist-port", str(self.dist_port),
                "--timeout", str(int(timeout_s))]
        if not self.management:
            args.append("--no-management")
        if self.tls:
            args += ["--tls-dir", str(self.tls.directory)]
        _live[self.name] = self
        _script(*args, timeout=timeout_s + 30)
        self.wait_until_up(timeout_s)

    def wait_until_up(self, timeout_s: float = 60) -> None:
        """Until the AMQP (and management) ports accept connections."""
        ports = [self.amqp_port] + ([self.mgmt_port] if self.management else [])
        deadline = time.monotonic() + timeout_s
        while not all(_accepts(port) for port in ports):
            if time.monotonic() > deadline:
                raise NodeError(f"{self.nodename}: ports {ports} not open after {timeout_s}s")
            time.sleep(0.2)

    def stop_app(self) -> None:
        _script("stop-app", self.name)

    def start_app(self) -> None:
        _script("start-app", self.name)
        self.wait_until_up()

    def restart(self) -> None:
        """Stop the node's VM and start it again (its data survives)."""
        self.stop()
        self.start()

    def start_again(self, timeout_s: float = 180) -> None:
        """Start a stopped or killed node with its configuration and data (a cluster
        member rejoins its cluster)."""
        _live[self.name] = self
        _script("restart", self.name, str(int(timeout_s)), timeout=timeout_s + 30)
        self.wait_until_up(timeout_s)

    def running(self) -> bool:
        return _accepts(self.amqp_port)

    def stop(self) -> None:
        _script("stop", self.name)

    def kill(self) -> None:
        """kill -9 of the node's Erlang VM: a crash."""
        _script("kill", self.name)

    def join(self, first: LocalNode) -> None:
        _script("join", self.name, first.name, timeout=180)

    def ctl(self, *args: str) -> str:
        """Any rabbitmqctl command against this node."""
        return _script("ctl", self.name, *args)

    def clean(self) -> None:
        """Kill the node if it runs and delete its state (idempotent)."""
        _live.pop(self.name, None)
        _script("clean", self.name)


def _accepts(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
        return True
    return False


def _clean_all() -> None:
    for node in list(_live.values()):
        with contextlib.suppress(Exception, pytest.fail.Exception):
            node.clean()


def _clean_orphans() -> None:
    """Nodes left by test sessions that were killed before they could clean up."""
    if not NODES_DIR.is_dir():
        return
    for path in NODES_DIR.glob("hutch-t*-*"):
        owner = path.name.split("-")[1][1:]
        if owner.isdigit() and not Path(f"/proc/{owner}").exists():
            with contextlib.suppress(Exception, pytest.fail.Exception):
                _script("clean", path.name)


atexit.register(_clean_all)


class NodeFactory:
    """Starts nodes named ``hutch-t<pid>-<label>``; :meth:`clean` removes them all."""

    def __init__(self) -> None:
        self._nodes: list[LocalNode] = []

    def make(self, label: str, *, management: bool = True, tls: TlsFiles | None = None
             ) -> LocalNode:
        """A node this factory cleans up, not started yet."""
        node = LocalNode(f"hutch-t{os.getpid()}-{label}", management=management, tls=tls)
        self._nodes.append(node)
        return node

    def start(self, label: str, *, management: bool = True, tls: TlsFiles | None = None
              ) -> LocalNode:
        node = self.make(label, management=management, tls=tls)
        node.start()
        return node

    def clean(self) -> None:
        for node in self._nodes:
            with contextlib.suppress(Exception, pytest.fail.Exception):
                node.clean()
        self._nodes.clear()


def _parallel(calls: list[Callable[[], None]]) -> None:
    """Run blocking node commands side by side (each waits on a subprocess)."""
    with ThreadPoolExecutor(len(calls)) as pool:
        for future in [pool.submit(call) for call in calls]:
            future.result()


@dataclass
class LocalCluster:
    """Nodes of the tests' own joined into one cluster (the first one's)."""

    nodes: list[LocalNode]

    @classmethod
    def start(cls, factory: NodeFactory, label: str, size: int = 3) -> LocalCluster:
        """Start ``size`` nodes side by side, then join the others to the first (about
        50 s for three on the 2-core CI machine: the joins are one after another)."""
        nodes = [factory.make(f"{label}-{i}") for i in range(1, size + 1)]
        _parallel([node.start for node in nodes])
        for node in nodes[1:]:
            node.join(nodes[0])
        return cls(nodes)

    def urls(self, vhost: str = "/", order: list[int] | None = None) -> list[str]:
        """Every node's AMQP URL, in ``order`` (node indexes; default 0, 1, 2, ...)."""
        return [self.nodes[i].amqp_url(vhost) for i in (order or range(len(self.nodes)))]

    def node_named(self, nodename: str) -> LocalNode:
        return next(node for node in self.nodes if node.nodename == nodename)

    def start_stopped(self) -> None:
        """Start every node that is not running, side by side (a whole-cluster restart
        needs them together: each waits for its peers)."""
        stopped = [node for node in self.nodes if not node.running()]
        if stopped:
            _parallel([node.start_again for node in stopped])

    def stop_all(self) -> None:
        _parallel([node.stop for node in self.nodes])

    def clean(self) -> None:
        for node in self.nodes:
            with contextlib.suppress(Exception, pytest.fail.Exception):
                node.clean()


@pytest.fixture(scope="session")
def node_factory() -> Iterator[NodeFactory]:
    """Start local nodes; every one is killed and deleted when the session ends."""
    _clean_orphans()
    factory = NodeFactory()
    try:
        yield factory
    finally:
        factory.clean()


@pytest.fixture(scope="module")
def local_node(node_factory: NodeFactory, request: pytest.FixtureRequest
               ) -> Iterator[LocalNode]:
    """A plain node (AMQP and management API, guest/guest) for this test module."""
    label = request.module.__name__.rsplit(".", 1)[-1].replace("_", "-")[:30]
    node = node_factory.start(label)
    try:
        yield node
    finally:
        node.clean()


@pytest.fixture(scope="session")
def local_cluster(node_factory: NodeFactory) -> Iterator[LocalCluster]:
    """Three local nodes in one cluster, shared by the cluster tests of the session. A
    test that stops or kills nodes starts them again before it ends."""
    cluster = LocalCluster.start(node_factory, "cl")
    try:
        yield cluster
    finally:
        cluster.clean()
