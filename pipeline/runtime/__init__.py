"""How Hutch's long-running processes run their coroutines.

- :mod:`pipeline.runtime.eventloop`: the event loop (asyncio, or uvloop on request);
- :mod:`pipeline.runtime.background`: a coroutine run as a task for the span of a block.
"""
