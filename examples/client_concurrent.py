"""Run many chat calls at once on one `HutchClient`, at two priorities.

One client matches every reply to its call by correlation id, so `asyncio.gather` over
any number of calls needs nothing else. When the backends are saturated, the
high-priority calls overtake the queued low-priority ones. Needs a running Hutch that
serves `mock-small`, such as the compose stack. Run:

    HUTCH_AMQP_URL=amqp://hutch:hutch@127.0.0.1:5672/ python examples/client_concurrent.py
"""

import asyncio

from hutch import HutchClient, load_settings


async def ask(client: HutchClient, number: int, priority: int) -> str:
    completion = await client.chat(
        model="mock-small", messages=[{"role": "user", "content": f"question {number}"}],
        priority=priority, timeout=60)
    return str(completion.choices[0].message.content)


async def main() -> None:
    async with HutchClient.from_settings(load_settings(), client_id="my-app-1") as client:
        low = [ask(client, n, priority=0) for n in range(20)]
        high = [ask(client, n, priority=9) for n in range(20, 25)]
        answers = await asyncio.gather(*low, *high)
        print(f"{len(answers)} answers; the last one: {answers[-1]}")


asyncio.run(main())
