"""Telling a queue that is down from a queue that does not exist.

RabbitMQ answers a passive declare of a missing queue and of a classic queue whose node
is down with the same 404 (``NOT_FOUND``); only the text differs: "no queue 'q' in vhost
'v'" against "home node 'rabbit@n' of durable queue 'q' in vhost 'v' is down or
inaccessible". The first needs ``hutch topology apply``; the second only needs the node
back, and a worker waits for it instead of exiting.
"""

from __future__ import annotations

import aiormq

__all__ = ["amqp_reason", "home_node_down"]


def amqp_reason(exc: BaseException) -> str:
    """The broker's text of an AMQP error (``NOT_FOUND - ...``), else its repr."""
    texts = [arg for arg in exc.args if isinstance(arg, str)]
    return texts[-1] if texts else repr(exc)


def home_node_down(exc: BaseException) -> bool:
    """True for the 404 of a durable queue whose node is down (it exists; wait)."""
    text = amqp_reason(exc)
    return (isinstance(exc, aiormq.exceptions.ChannelNotFoundEntity)
            and ("home node" in text or "down or inaccessible" in text))
