"""``hutch bench``: open-loop load generation against Hutch, with per-class latency figures.

A package of its own beside the library: it imports ``pipeline`` (never the reverse) and
joins the ``hutch`` command line through the ``hutch.commands`` entry point, as
``topology`` does. ``nodes/rabbitmq-node`` (package data: scripts/rabbitmq-node of the
checkout) starts the cluster scenario's RabbitMQ nodes.

- :mod:`hutch_bench.commands`: the ``bench`` command line (registration only, light);
- :mod:`hutch_bench.cli`: what the commands run (``run_bench``, ``run_scenario``);
- :mod:`hutch_bench.loadgen`: send schedules, priority mixes, the open-loop runner;
- :mod:`hutch_bench.report`: percentiles, summaries, the table;
- :mod:`hutch_bench.plots`: the scenarios' PNG plots (matplotlib);
- :mod:`hutch_bench.stack`: the processes a scenario starts (mock, workers);
- :mod:`hutch_bench.baseline`: the minimal aio-pika RPC the overhead scenario compares;
- :mod:`hutch_bench.cluster_nodes`: the cluster scenario's own RabbitMQ nodes;
- :mod:`hutch_bench.scenarios`: one module per ``hutch bench scenario NAME``.

Nothing is imported here: ``hutch --help`` imports :mod:`hutch_bench.commands` alone.
"""

__all__: list[str] = []
