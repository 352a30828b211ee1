"""Stream one chat answer with plain aio-pika, no Hutch code: the wire contract by hand.

Publish `"stream": true`, then read the reply queue: chunk messages (a JSON array of
`chat.completion.chunk` objects each) numbered per attempt by `x-hutch-seq`, then one
final message with the whole answer. Show chunks in order, drop repeats, follow one
attempt (`x-hutch-stream-id`) and, at the end, show whatever the final message has that
the chunks did not (chunks are transient: a broker restart may lose some). Needs a
running Hutch that serves `mock-small`, such as the compose stack. Run:

    HUTCH_AMQP_URL=amqp://hutch:hutch@127.0.0.1:5672/ python examples/raw_streaming.py
"""

import asyncio
import json
import os
import time
import uuid

import aio_pika

AMQP_URL = os.environ.get("HUTCH_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
PREFIX = os.environ.get("HUTCH_PREFIX", "llm")


class Answer:
    """What the user has been shown, from one attempt at streaming the answer."""

    def __init__(self) -> None:
        self.shown = ""
        self.stream_id, self.next_seq, self.held = None, 0, {}

    def follow(self, stream_id: str | None) -> None:
        if self.shown:  # never splice two attempts: start the answer over
            print("\n[a worker died mid-answer: the answer starts over]")
        self.shown = ""
        self.stream_id, self.next_seq, self.held = stream_id, 0, {}

    def chunk(self, headers: dict, body: bytes) -> None:
        if headers["x-hutch-stream-id"] != self.stream_id:
            self.follow(headers["x-hutch-stream-id"])
        if headers["x-hutch-seq"] >= self.next_seq:  # a lower number is a repeat
            self.held[headers["x-hutch-seq"]] = json.loads(body)
        while self.next_seq in self.held:  # show what is in order, hold the rest
            for chunk in self.held.pop(self.next_seq):
                for choice in chunk["choices"]:
                    piece = choice["delta"].get("content") or ""
                    print(piece, end="", flush=True)
                    self.shown += piece
            self.next_seq += 1

    def final(self, headers: dict, body: bytes) -> None:
        data = json.loads(body)  # the final message is complete: trust it
        if headers.get("x-hutch-outcome") != "ok":
            print(f"\n{data['error']['code']}: {data['error']['message']}")
            return
        text = data["choices"][0]["message"]["content"]
        if headers.get("x-hutch-stream-id") != self.stream_id or not text.startswith(
                self.shown):
            self.follow(headers.get("x-hutch-stream-id"))  # another attempt's answer
        print(text[len(self.shown):])  # what the chunks missed (often nothing)
        usage = data.get("usage") or {}
        print(f"{headers.get('x-hutch-seq')} chunk messages, "
              f"{usage.get('total_tokens')} tokens in all")


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
        body = {"model": "mock-small", "messages": [{"role": "user", "content": "hello"}],
                "stream": True, "stream_options": {"include_usage": True}}
        await requests.publish(aio_pika.Message(
            json.dumps(body).encode(), content_type="application/json",
            correlation_id=correlation_id, reply_to=replies.name,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT, expiration=30,
            headers={"x-hutch-sent-at": now_ms, "x-hutch-deadline": now_ms + 30_000},
        ), routing_key="mock-small")

        answer = Answer()
        async with asyncio.timeout(60), replies.iterator() as incoming:
            async for message in incoming:
                await message.ack()
                if message.correlation_id != correlation_id:
                    continue  # a late or duplicate reply to an earlier request
                headers = message.headers or {}
                kind = headers.get("x-hutch-kind")
                if kind == "chunk":
                    answer.chunk(headers, message.body)
                elif kind in (None, "final"):  # not "status", nor a kind added later
                    answer.final(headers, message.body)
                    break


asyncio.run(main())
