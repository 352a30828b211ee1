"""An OpenAI-compatible HTTP gateway in front of the queue (``hutch gateway``).

Applications that speak the OpenAI HTTP API (the official SDKs, frameworks built on them,
curl) use Hutch by changing only their ``base_url``: each HTTP call becomes a Hutch request
on the broker, each reply (or chunk stream) an HTTP response (or server-sent events).

One concept per module, in the order a request meets them: :mod:`.settings` (the
``[gateway]`` section), :mod:`.auth` (API keys to client identities), :mod:`.calls` (an
HTTP request checked and turned into a call: priority, deadline, endpoint),
:mod:`.responses` (replies and errors as OpenAI answers them), :mod:`.app` (the aiohttp
handlers), :mod:`.metrics`, and :mod:`.server` (the process). This package's ``__init__``
imports nothing: :mod:`pipeline.settings` reads :mod:`.settings` from here, and nothing
else may be loaded with it.
"""

__all__: list[str] = []
