"""Stream a chat answer with `HutchClient.chat_stream()`, and cancel one by leaving it.

`chat_stream()` yields OpenAI `chat.completion.chunk` objects as they come and then has
the whole `chat.completion`. It drops repeated chunks, fills missed ones from the final
message, and never splices two attempts: if a worker dies mid-answer and the request is
streamed again, it raises `StreamInterruptedError` with `restarted=True`, and iterating
again follows the new attempt from its start. Leaving the block (or breaking out of the
loop) before the end cancels the request on the broker. Needs a running Hutch that
serves `mock-small`, such as the compose stack. Run:

    HUTCH_AMQP_URL=amqp://hutch:hutch@127.0.0.1:5672/ python examples/client_stream.py
"""

import asyncio

from hutch import ChatStream, HutchClient, RequestFailed, StreamInterruptedError, load_settings

HELLO = [{"role": "user", "content": "hello"}]


async def show(stream: ChatStream) -> None:
    """Print the answer as it comes; start over if the stream restarts."""
    while True:
        try:
            async for chunk in stream:
                for choice in chunk.choices:
                    print(choice.delta.content or "", end="", flush=True)
            print()
            return
        except StreamInterruptedError as exc:
            if not exc.restarted:
                raise  # cut short: the backend failed mid-answer
            print("\n[a worker died mid-answer: the answer starts over]")


async def main() -> None:
    async with HutchClient.from_settings(load_settings(), client_id="my-app-1") as client:
        try:
            async with client.chat_stream(
                    model="mock-small", messages=HELLO, priority=5, timeout=30,
                    stream_options={"include_usage": True}) as stream:
                await show(stream)
                completion = await stream.completion()
            usage = completion.usage
            print(f"finish_reason {completion.choices[0].finish_reason}, "
                  f"{usage.total_tokens if usage else '?'} tokens")
        except RequestFailed as exc:
            print(exc.code, exc.message)

        async with client.chat_stream(model="mock-small", messages=HELLO) as other:
            async for _ in other:
                break  # enough: leaving early cancels the request on the broker
        print(f"cancelled request {other.correlation_id} after its first chunk")


asyncio.run(main())
