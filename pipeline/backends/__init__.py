"""Calling the LLM backends: HTTP, and how each backend's health gates its consumer.

- :mod:`pipeline.backends.http`: :class:`~pipeline.backends.http.Backend`, one
  OpenAI-compatible endpoint; ``chat`` reads a completion, ``stream`` reads as it arrives;
  failures are raised as the typed errors of :mod:`pipeline.errors`;
- :mod:`pipeline.backends.transport`: Hutch's httpx transport over aiohttp (fast, streams,
  maps aiohttp's errors to httpx's public ones);
- :mod:`pipeline.backends.breaker`: the gate (circuit breaker, 429 throttle) and the latency
  floor of one backend.
"""
