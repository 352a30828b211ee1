"""Configuration as data, beside the runtime: it imports :mod:`pipeline`, never the reverse.

- :mod:`topology.definitions`: the topology as a RabbitMQ definitions file (``export``);
- :mod:`topology.diff`: the configuration compared with a live broker (``diff``);
- :mod:`topology.clients`: least-privilege client and worker users;
- :mod:`topology.commands`: their ``hutch`` commands, joined to the CLI by the
  ``hutch.commands`` entry point (pyproject.toml).
"""
