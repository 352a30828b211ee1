"""What tests, the demo and the benchmarks run Hutch against.

- :mod:`pipeline.testing.mock`: an OpenAI-compatible mock backend with a hard slot cap
  and fault injection (``hutch mock-backend``);
- :mod:`pipeline.testing.embedded`: a mock backend and a worker in this process.
"""
