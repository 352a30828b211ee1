"""A pool's pause state: the message count of ``<prefix>.pause.<pool>``.

The state lives in a queue that always exists (``hutch topology apply`` declares it), of
the pool's own type, so:

* reading it is a passive declare of a queue that is there: no 404, so no closed channel
  and no error in the broker's log (the old flag, a queue that existed only while the
  pool was paused, cost every worker a channel error per pool per poll);
* a quorum pool's state is a quorum queue: it survives the loss of any one node, and a
  classic pool's sits on the node of the pool's own queue (declared by the same
  connection), so it is as available as the pool;
* a quorum queue whose leader cannot be reached answers a passive declare with 0
  messages (RabbitMQ's ``rabbit_quorum_queue:stat/2`` falls back to ``{0, 0}``): 0 must
  therefore mean nothing. One message (the floor, put there by ``apply``) is "running";
  each message beyond it is a pause; 0 is "the broker could not tell", and a reader
  keeps what it knew.

Pausing publishes (confirmed) until there are at least two messages; resuming takes
messages (``basic.get``: the leader's own answer, unlike the count) until one is left.
In the management UI: publish any message to the queue to pause, get one (ack) to resume.
"""

from __future__ import annotations

import json
import time
from collections.abc import Set

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractQueue

from pipeline.broker.names import Names
from pipeline.settings import Settings

__all__ = ["RUNNING", "read_pause", "seed_pause_states", "set_paused", "state_of"]

#: The message count of a running pool's state queue (the floor).
RUNNING = 1


def state_of(messages: int | None) -> bool | None:
    """Paused (True), running (False) or unknown (None) for a message count."""
    if not messages:
        return None
    return messages > RUNNING


async def read_pause(channel: AbstractChannel, queue: str) -> bool | None:
    """The state by a passive declare; None if the broker could not tell. A missing
    queue or a classic queue's node that is down raises (the channel is then closed)."""
    declared = await channel.declare_queue(queue, passive=True)
    return state_of(declared.declaration_result.message_count)


async def _publish(channel: AbstractChannel, queue: str, state: str, count: int) -> None:
    body = json.dumps({"state": state, "at": time.time()}).encode()
    for _ in range(count):
        await channel.default_exchange.publish(
            aio_pika.Message(body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                             content_type="application/json"), routing_key=queue)


async def _empty(queue: AbstractQueue) -> bool:
    """True if the queue holds nothing, by the leader's own answer (a basic.get whose
    message, if any, goes back)."""
    message = await queue.get(no_ack=False, fail=False)
    if message is None:
        return True
    await message.nack(requeue=True)
    return False


async def set_paused(channel: AbstractChannel, queue_name: str, paused: bool) -> None:
    """Pause or resume; ``channel`` must confirm publishes. Idempotent."""
    queue = await channel.declare_queue(queue_name, passive=True)
    count = queue.declaration_result.message_count or 0
    if paused:
        # 1 (running): one more. 0 (unknown or empty): two, which is paused either way.
        if count < 2:
            await _publish(channel, queue_name, "paused", 2 - count)
        return
    if count == RUNNING:
        return
    while True:
        message = await queue.get(no_ack=True, fail=False)
        if message is None or not message.message_count:
            # Empty, or the floor was just taken: put the floor (back).
            await _publish(channel, queue_name, "running", 1)
            return
        if message.message_count == RUNNING:
            return


async def _seed(channel: AbstractChannel, queue_name: str, created: bool,
                paused: bool) -> str | None:
    """Put the floor into a new (or truly empty) state queue, and a pause if the pool was
    paused by the old flag; a line for apply's report, or None if nothing changed."""
    queue = await channel.declare_queue(queue_name, passive=True)
    if created or (not queue.declaration_result.message_count and await _empty(queue)):
        await _publish(channel, queue_name, "running", RUNNING)
        if paused:
            await _publish(channel, queue_name, "paused", 1)
        return f"{queue_name} ({'paused' if paused else 'running'})"
    if paused:
        await set_paused(channel, queue_name, True)
        return f"{queue_name} (paused)"
    return None


async def seed_pause_states(settings: Settings, channel: AbstractChannel,
                            listed: Set[str]) -> list[str]:
    """apply, after declaring the state queues (``listed``: the queues before it): every
    pool's state set, and each old pause flag ``<prefix>.paused.<pool>`` turned into a
    pause of the state, then deleted. ``channel`` confirms publishes."""
    names = Names(settings.prefix)
    lines = []
    for pool in settings.pools:
        state = names.pause_state_queue(pool.name)
        legacy = names.pause_queue(pool.name)
        line = await _seed(channel, state, state not in listed, legacy in listed)
        if legacy in listed:
            await channel.queue_delete(legacy)
            line = f"{line}, from the old flag {legacy} (deleted)"
        if line is not None:
            lines.append(line)
    return lines
