from tests.conftest import hutch


async def test_chat_end_to_end(make_settings, mock):
    settings = make_settings([("b1", mock.base_url, 4)])
    async with hutch(settings) as client:
        reply = await client.request(
            {"model": "mock-small", "messages": [{"role": "user", "content": "hello"}]},
            model="mock-small", priority=3, timeout=10)
    assert reply.completion.choices[0].message.content == "mock reply to: hello"
    assert reply.backend == settings.pools[0].backends[0].name
    assert reply.queue_wait_ms is not None
