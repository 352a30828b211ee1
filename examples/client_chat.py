"""Ask for one chat completion with `HutchClient` and handle each error code.

`chat()` publishes with confirms, waits for the reply on the client's own durable reply
queue and raises the exception of the reply's error code. The URL and the prefix come
from the `HUTCH_*` environment variables, as for any Hutch configuration. Needs a
running Hutch that serves `mock-small`, such as the compose stack. Run:

    HUTCH_AMQP_URL=amqp://hutch:hutch@127.0.0.1:5672/ python examples/client_chat.py
"""

import asyncio

from hutch import (
    DeadlineExceededError,
    HutchClient,
    QueueFullError,
    RequestFailed,
    load_settings,
)


async def main() -> None:
    settings = load_settings()  # or load_settings("hutch.toml")
    async with HutchClient.from_settings(settings, client_id="my-app-1") as client:
        try:
            completion = await client.chat(
                model="mock-small", messages=[{"role": "user", "content": "hello"}],
                priority=5, timeout=30, max_tokens=64)  # extra params go to the backend
            print(completion.choices[0].message.content)
        except QueueFullError:
            print("overloaded: try later")
        except DeadlineExceededError:
            print("no answer within 30 s")
        except RequestFailed as exc:
            print(exc.code, exc.message)


asyncio.run(main())
