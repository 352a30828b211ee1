"""Send one chat request with plain aio-pika, no Hutch code: the wire contract by hand.

Publish with confirms (a nack is `queue_full`), to `<prefix>.requests` with the model as
routing key, then read the answer from a durable reply queue of your own. Needs a
running Hutch that serves `mock-small`, such as the compose stack. Run:

    HUTCH_AMQP_URL=amqp://hutch:hutch@127.0.0.1:5672/ python examples/raw_aio_pika.py

HUTCH_PREFIX (default `llm`) is the prefix of the exchange and queue names.
"""

import asyncio
import json
import os
import time
import uuid

import aio_pika
from aio_pika.exceptions import DeliveryError

AMQP_URL = os.environ.get("HUTCH_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
PREFIX = os.environ.get("HUTCH_PREFIX", "llm")


async def main() -> None:
    connection = await aio_pika.connect(AMQP_URL)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        replies = await channel.declare_queue(
            f"{PREFIX}.reply.my-app-1", durable=True,
            arguments={"x-queue-type": "classic", "x-expires": 3_600_000})
        requests = await channel.get_exchange(f"{PREFIX}.requests", ensure=False)

        correlation_id = uuid.uuid4().hex
        now_ms = int(time.time() * 1000)
        body = {"model": "mock-small", "messages": [{"role": "user", "content": "hello"}]}
        message = aio_pika.Message(
            json.dumps(body).encode(),
            content_type="application/json",
            correlation_id=correlation_id,
            reply_to=replies.name,
            priority=5,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            expiration=30,  # aio-pika takes seconds; on the wire it is "30000" (ms)
            headers={"x-hutch-sent-at": now_ms, "x-hutch-deadline": now_ms + 30_000},
        )
        try:
            await requests.publish(message, routing_key="mock-small")
        except DeliveryError:  # the broker nacked: the pool's queue is full
            print("queue_full")
            return

        async with asyncio.timeout(35), replies.iterator() as incoming:
            async for reply in incoming:
                await reply.ack()
                if reply.correlation_id != correlation_id:
                    continue  # a late or duplicate reply to an earlier request
                data = json.loads(reply.body)
                if reply.headers.get("x-hutch-outcome") == "ok":
                    print(data["choices"][0]["message"]["content"])
                else:
                    print(data["error"]["code"], data["error"]["message"])
                break


asyncio.run(main())
