"""Send a raw request body with `HutchClient.request()` and read the reply's metadata.

`request()` takes any JSON body (or bytes) and returns the reply with its headers and
timings: which backend served it, how long it waited in the queue, the latency the
client saw. Needs a running Hutch that serves `mock-small`, such as the compose stack.
Run:

    HUTCH_AMQP_URL=amqp://hutch:hutch@127.0.0.1:5672/ python examples/client_request.py
"""

import asyncio

from hutch import HutchClient, load_settings


async def main() -> None:
    async with HutchClient.from_settings(load_settings(), client_id="my-app-1") as client:
        reply = await client.request(
            {"model": "mock-small", "messages": [{"role": "user", "content": "hi"}]},
            model="mock-small", priority=9, timeout=30)
        print(reply.completion.choices[0].message.content)
        print(f"backend {reply.backend}, queued {reply.queue_wait_ms} ms, "
              f"{reply.latency_s * 1000:.0f} ms in all")


asyncio.run(main())
