"""``hutch bench``: open-loop load generation against Hutch, with per-class latency figures.

- :mod:`pipeline.bench.commands`: the ``bench`` command line (registration only, light);
- :mod:`pipeline.bench.cli`: what the commands run (``run_bench``, ``run_scenario``);
- :mod:`pipeline.bench.loadgen`: send schedules, priority mixes, the open-loop runner;
- :mod:`pipeline.bench.report`: percentiles, summaries, the table;
- :mod:`pipeline.bench.plots`: the scenarios' PNG plots (matplotlib);
- :mod:`pipeline.bench.stack`: the processes a scenario starts (mock, workers);
- :mod:`pipeline.bench.baseline`: the minimal aio-pika RPC the overhead scenario compares;
- :mod:`pipeline.bench.scenarios`: one module per ``hutch bench scenario NAME``.

Nothing is imported here: ``hutch --help`` imports :mod:`pipeline.bench.commands` alone.
"""

__all__: list[str] = []
