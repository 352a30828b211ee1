"""The shortest `HutchClient` program: one chat completion at priority 5 (docs/client.md).

Run it against a running Hutch that serves `mock-small`, such as the compose stack:

    HUTCH_AMQP_URL=amqp://hutch:hutch@127.0.0.1:5672/ python examples/client_minimal.py
"""

import asyncio

from pipeline import HutchClient, load_settings


async def main() -> None:
    async with HutchClient.from_settings(load_settings(), client_id="my-app-1") as client:
        completion = await client.chat(
            model="mock-small", messages=[{"role": "user", "content": "hello"}],
            priority=5, timeout=30)
        print(completion.choices[0].message.content)


asyncio.run(main())
