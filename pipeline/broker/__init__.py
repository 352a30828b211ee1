"""The broker side: what Hutch declares on RabbitMQ and how it talks to its HTTP API.

- :mod:`pipeline.broker.names`: every exchange, queue and policy name, from one prefix;
- :mod:`pipeline.broker.topology`: the topology planned from the settings, declared
  idempotently (``hutch topology apply``);
- :mod:`pipeline.broker.management`: a small client of the management HTTP API.
"""
