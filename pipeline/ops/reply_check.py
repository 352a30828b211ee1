"""Whether a reply queue still exists, for ``hutch dlq replay``.

Replaying a request whose reply queue is gone (a one-shot ``hutch submit``'s, or one whose
``x-expires`` passed) calls the backend again for nobody: the completion cannot be
delivered and the request is parked again. Each name is checked once, with a passive
declare on a channel of its own (a missing queue closes the channel it is asked on).
"""

from __future__ import annotations

import aiormq
from aio_pika.abc import AbstractConnection

__all__ = ["ReplyQueues"]


class ReplyQueues:
    """Cached answers to "does this reply queue exist?" on one connection."""

    def __init__(self, connection: AbstractConnection) -> None:
        self._connection = connection
        self._known: dict[str, bool] = {}

    async def exists(self, name: str) -> bool:
        if name in self._known:
            return self._known[name]
        channel = await self._connection.channel(publisher_confirms=False)
        try:
            await channel.declare_queue(name, passive=True)
            found = True
        except aiormq.exceptions.ChannelNotFoundEntity:
            found = False
        except aiormq.exceptions.ChannelLockedResource:
            found = True  # another connection's exclusive queue: its client is there
        finally:
            if not channel.is_closed:
                await channel.close()
        self._known[name] = found
        return found
