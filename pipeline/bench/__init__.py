"""``hutch bench``: open-loop load generation against Hutch, with per-class latency figures.

- :mod:`pipeline.bench.loadgen`: send schedules, priority mixes, the open-loop runner;
- :mod:`pipeline.bench.report`: percentiles, summaries, the table;
- :mod:`pipeline.testing.embedded`: a mock backend and a worker in-process (``--embedded``);
- :mod:`pipeline.bench.cli`: the ``bench`` subcommand (:func:`add_cli`).
"""

from __future__ import annotations

from pipeline.bench.cli import add_cli, cmd_bench, run_bench
from pipeline.bench.loadgen import (
    PriorityClass,
    assign_classes,
    parse_priority_mix,
    schedule,
)
from pipeline.bench.report import percentile, summarize
from pipeline.testing.embedded import Embedded, embedded_hutch

__all__ = [
    "Embedded",
    "PriorityClass",
    "add_cli",
    "assign_classes",
    "cmd_bench",
    "embedded_hutch",
    "parse_priority_mix",
    "percentile",
    "run_bench",
    "schedule",
    "summarize",
]
