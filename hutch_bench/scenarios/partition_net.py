"""A network partition between RabbitMQ nodes of a run's own, made and healed from Erlang.

There is no iptables on the CI machine and every node listens on 127.0.0.1, so the
partition is made inside the Erlang distribution: on the node to isolate,
``erlang:set_cookie(Peer, <another cookie>)`` for each peer, then
``erlang:disconnect_node(Peer)``. Both sides see ``nodedown`` at once, and neither can
connect again (the handshake fails on the cookie in both directions) while the CLI tools,
which use the node's own cookie, still reach every node. Healing puts the node's cookie
back for those peers: the nodes reconnect by themselves, and RabbitMQ sees exactly what a
real partition shows it (Mnesia's ``inconsistent_database, running_partitioned_network``;
``rabbitmqctl cluster_status`` lists the partition under ``ignore``; ``pause_minority``
pauses the isolated node and starts it again once it sees the majority).

One difference with a cable pulled: a real partition is noticed only after
``net_ticktime`` (60 s by default, so 45-75 s), this one at once.

The partition handling mode is switched at run time (``application:set_env``): RabbitMQ
reads ``cluster_partition_handling`` when it handles a node's loss, as its own partition
tests do. All of it is rabbitmqctl ``eval`` against nodes this run started.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from hutch_bench.cluster_nodes import BenchNode
from pipeline.errors import StackError

__all__ = ["MODES", "heal", "isolate", "partitions", "rabbit_running", "restart_app",
           "set_handling"]

#: ``cluster_partition_handling`` values measured (RabbitMQ's default is ``ignore``).
MODES = ("pause_minority", "ignore", "autoheal")
_FOREIGN_COOKIE = "hutch_partition"


def _atoms(nodes: Sequence[BenchNode]) -> str:
    return "[" + ", ".join(f"'{node.nodename}'" for node in nodes) + "]"


async def _eval(node: BenchNode, expression: str) -> str:
    return (await node.ctl("-q", "eval", expression)).strip()


async def set_handling(nodes: Sequence[BenchNode], mode: str) -> None:
    """``cluster_partition_handling = mode`` on every node, from now on."""
    if mode not in MODES:
        raise ValueError(f"partition handling {mode!r}: expected one of {', '.join(MODES)}")
    for node in nodes:
        await _eval(node, f"application:set_env(rabbit, cluster_partition_handling, {mode}).")


async def isolate(node: BenchNode, peers: Sequence[BenchNode]) -> None:
    """Cut ``node`` from ``peers`` (both ways) until :func:`heal`."""
    await _eval(node, f"[begin erlang:set_cookie(N, {_FOREIGN_COOKIE}), "
                      f"erlang:disconnect_node(N) end || N <- {_atoms(peers)}].")


async def heal(node: BenchNode, peers: Sequence[BenchNode]) -> None:
    """Let ``node`` and ``peers`` connect again (they do so by themselves)."""
    await _eval(node, f"[erlang:set_cookie(N, erlang:get_cookie()) || N <- {_atoms(peers)}], "
                      f"[net_adm:ping(N) || N <- {_atoms(peers)}].")


async def partitions(node: BenchNode) -> list[str]:
    """The nodes ``node`` records a partition with (``rabbitmqctl cluster_status``'s
    "Network Partitions"); empty when RabbitMQ saw none, or has handled it."""
    return re.findall(r"'([^']+)'", await _eval(node, "rabbit_node_monitor:partitions()."))


async def rabbit_running(node: BenchNode) -> bool:
    """Whether RabbitMQ runs on ``node`` (False: paused by ``pause_minority``, stopped,
    or its VM does not answer)."""
    try:
        return await _eval(node, "rabbit:is_running().") == "true"
    except StackError:
        return False


async def restart_app(node: BenchNode) -> None:
    """``stop_app`` then ``start_app``: the operator's repair of the side not trusted
    after a partition under ``ignore`` (it resyncs from the others; its clients
    reconnect)."""
    await node.ctl("-q", "stop_app", timeout_s=120)
    await node.ctl("-q", "start_app", timeout_s=120)
    await node.ctl("-q", "await_startup", timeout_s=120)
