"""``hutch bench``'s command line: ``bench``, ``bench scenario NAME``, ``bench plot``.

The registration only: it lives in the bench package so the benchmark's options evolve
with the benchmark, and it imports nothing of it, so ``hutch --help`` stays fast. The
runs are in :mod:`hutch_bench.cli`; a scenario's options are the fields of its
dataclass, added when ``bench scenario`` is chosen.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable
from typing import Any

from pipeline.cli.common import Subparsers, add_config, add_lazy_parser, add_subcommands

__all__ = ["register"]


def _positive(kind: type[int] | type[float]) -> Callable[[str], Any]:
    def parse(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be positive: {text!r}")
        return value
    return parse


def register(sub: Subparsers) -> None:
    """Add ``bench`` (with ``scenario`` and ``plot``) to the ``hutch`` subcommands."""
    bench = sub.add_parser(
        "bench", help="open-loop load: requests at a set rate, latency per priority class",
        description="Send requests at a fixed rate (open loop) and report, per priority "
                    "class, counts, errors, throughput, queue wait and end-to-end latency "
                    "measured from each request's intended send time.")
    # --embedded needs only a broker URL, which HUTCH_AMQP_URL can give: like `submit`,
    # the configuration file is optional here.
    add_config(bench, required=False)
    bench.add_argument("--rate", type=_positive(float), default=20.0,
                       help="requests per second (default 20)")
    bench.add_argument("--duration", type=_positive(float), default=10.0,
                       help="seconds of sending (default 10)")
    bench.add_argument("--arrival", choices=("constant", "poisson"), default="poisson",
                       help="send times: evenly spaced, or a Poisson process (default)")
    bench.add_argument("--seed", type=int, default=None,
                       help="seed of the Poisson gaps, class order and random models")
    bench.add_argument("--models", "--model", "-m", dest="models", default="mock-small",
                       help="comma-separated models (default mock-small)")
    bench.add_argument("--model-choice", choices=("round-robin", "random"),
                       default="round-robin", help="how each request picks its model")
    bench.add_argument("--priority-mix", default="high=0.1,low=0.9",
                       help="class shares: NAME=SHARE (high=9, medium/normal=5, low=0) or "
                            "NAME:PRIORITY=SHARE, comma-separated, adding up to 1 "
                            "(default high=0.1,low=0.9)")
    bench.add_argument("--prompt-words", type=_positive(int), default=16,
                       help="words per prompt (default 16)")
    bench.add_argument("--max-tokens", type=_positive(int), default=None)
    bench.add_argument("--timeout", type=_positive(float), default=60.0,
                       help="each request's deadline in seconds (default 60)")
    bench.add_argument("--connections", type=_positive(int), default=1,
                       help="client connections; requests are spread over them (default 1)")
    bench.add_argument("--json", dest="json_path", metavar="FILE", default=None,
                       help="write every figure and the configuration to FILE as JSON")
    bench.add_argument("--no-progress", action="store_true",
                       help="no progress line (it is off anyway when stderr is no TTY)")
    bench.add_argument("--embedded", action="store_true",
                       help="start a mock backend and a worker in this process under a "
                            "prefix of their own (needs only a broker)")
    bench.add_argument("--mock-capacity", type=_positive(int), default=8,
                       help="--embedded: mock backend slots (default 8)")
    bench.add_argument("--mock-latency-ms", type=_positive(float), default=50.0,
                       help="--embedded: mock service time in ms (default 50)")
    bench.set_defaults(func=_run_bench)
    more = add_subcommands(bench, dest="bench_command", metavar="{scenario,plot}",
                           title="more")
    add_lazy_parser(
        more, "scenario", _add_scenarios,
        help="run a benchmark scenario: it starts its own mock, workers, clients",
        description="Run one of Hutch's benchmark scenarios. Each starts what it needs "
                    "(mock backend and worker processes under a prefix of its own, "
                    "removed afterwards) and needs only a broker with the management "
                    "plugin.")
    plot = more.add_parser("plot", help="redraw the plots of a scenario's --json file")
    plot.add_argument("json_file", help="a file written by scenario --json")
    plot.add_argument("--plot-dir", required=True, metavar="DIR")
    plot.set_defaults(func=_run_plot)


def _option_type(default: Any) -> Callable[[str], Any]:
    if isinstance(default, tuple):
        return lambda text: tuple(float(x) for x in text.split(",") if x.strip())
    if isinstance(default, bool):
        raise TypeError("boolean scenario options are flags")
    return _positive(type(default)) if isinstance(default, int | float) else str


def _add_scenarios(scenario: argparse.ArgumentParser) -> None:
    """One subcommand per scenario, one option per field of its options dataclass."""
    from hutch_bench.scenarios import SCENARIOS

    names = scenario.add_subparsers(dest="scenario", required=True, metavar="NAME")
    for item in SCENARIOS.values():
        summary = item.summary.replace("%", "%%")  # argparse formats help with %
        parser = names.add_parser(item.name, help=summary, description=summary)
        add_config(parser, required=False)
        for f in dataclasses.fields(item.options):
            flag = "--" + f.name.replace("_", "-")
            if f.name == "progress":
                parser.add_argument(flag, action="store_true",
                                    help="progress line on a terminal")
                continue
            shown = ",".join(f"{x:g}" for x in f.default) if isinstance(
                f.default, tuple) else f.default
            parser.add_argument(flag, dest=f.name, type=_option_type(f.default),
                                default=None, help=f"default {shown}")
        parser.add_argument("--quick", action="store_true",
                            help="a tiny run of the same code (smoke test, first look): "
                                 + ", ".join(f"{k}={v}" for k, v in item.quick.items()))
        parser.add_argument("--json", dest="json_path", metavar="FILE",
                            help="write every figure to FILE as JSON")
        parser.add_argument("--plot-dir", metavar="DIR",
                            help="draw the scenario's PNG plots into DIR (needs matplotlib)")
        parser.set_defaults(func=_run_scenario)


def _run_bench(args: argparse.Namespace) -> int:
    from hutch_bench.cli import cmd_bench

    return cmd_bench(args)


def _run_scenario(args: argparse.Namespace) -> int:
    from hutch_bench.cli import cmd_scenario

    return cmd_scenario(args)


def _run_plot(args: argparse.Namespace) -> int:
    from hutch_bench.cli import cmd_plot

    return cmd_plot(args)
