"""``hutch bench``: argument parsing and the run, for the ``hutch`` entry point.

Lives in the bench package (not ``pipeline/cli.py``) so the benchmark's options evolve with
the benchmark; ``pipeline/cli.py`` only calls :func:`add_cli`, as it does for
``topology diff``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import datetime
import json
import os
import platform
import random
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from pipeline.bench.loadgen import (
    LoadPlan,
    Progress,
    assign_classes,
    parse_priority_mix,
    run_load,
    schedule,
)
from pipeline.bench.plots import plot_report, require_matplotlib
from pipeline.bench.report import format_table, summarize
from pipeline.bench.scenarios import SCENARIOS
from pipeline.client.client import HutchClient
from pipeline.errors import ConfigError
from pipeline.observe.log import configure_logging
from pipeline.settings import Settings, load_settings
from pipeline.testing.embedded import embedded_hutch

__all__ = [
    "add_cli",
    "cmd_bench",
    "cmd_plot",
    "cmd_scenario",
    "machine",
    "parse",
    "run_bench",
    "run_scenario",
    "scenario_options",
]


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


def add_cli(sub: argparse._SubParsersAction[argparse.ArgumentParser],
            config_arg: Callable[[argparse.ArgumentParser], None]) -> None:
    """Add ``bench`` to the ``hutch`` subcommands."""
    bench = sub.add_parser(
        "bench", help="open-loop load: requests at a set rate, latency per priority class",
        description="Send requests at a fixed rate (open loop) and report, per priority "
                    "class, counts, errors, throughput, queue wait and end-to-end latency "
                    "measured from each request's intended send time.")
    # --embedded needs only a broker URL, which HUTCH_AMQP_URL can give: like `submit`,
    # the configuration file is optional here.
    _optional_config(bench, config_arg)
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
    bench.set_defaults(func=cmd_bench)
    _add_scenarios(bench.add_subparsers(dest="bench_command", metavar="{scenario,plot}",
                                        title="more"), config_arg)


def _optional_config(parser: argparse.ArgumentParser,
                     config_arg: Callable[[argparse.ArgumentParser], None]) -> None:
    """``--config`` as ``hutch`` defines it, but optional (settings from HUTCH_*)."""
    config_arg(parser)
    for action in parser._actions:
        if action.dest == "config":
            action.required = False


def _option_type(default: Any) -> Callable[[str], Any]:
    if isinstance(default, tuple):
        return lambda text: tuple(float(x) for x in text.split(",") if x.strip())
    if isinstance(default, bool):
        raise TypeError("boolean scenario options are flags")
    return _positive(type(default)) if isinstance(default, int | float) else str


def _add_scenarios(sub: argparse._SubParsersAction[argparse.ArgumentParser],
                   config_arg: Callable[[argparse.ArgumentParser], None]) -> None:
    scenario = sub.add_parser(
        "scenario", help="run a benchmark scenario: it starts its own mock, workers, clients",
        description="Run one of issue 5's benchmark scenarios. Each starts what it needs "
                    "(mock backend and worker processes under a prefix of its own, "
                    "removed afterwards) and needs only a broker with the management "
                    "plugin.")
    names = scenario.add_subparsers(dest="scenario", required=True, metavar="NAME")
    for item in SCENARIOS.values():
        summary = item.summary.replace("%", "%%")  # argparse formats help with %
        parser = names.add_parser(item.name, help=summary, description=summary)
        _optional_config(parser, config_arg)
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
        parser.set_defaults(func=cmd_scenario)
    plot = sub.add_parser("plot", help="redraw the plots of a scenario's --json file")
    plot.add_argument("json_file", help="a file written by scenario --json")
    plot.add_argument("--plot-dir", required=True, metavar="DIR")
    plot.set_defaults(func=cmd_plot)


def scenario_options(args: argparse.Namespace) -> Any:
    """The options dataclass of ``args.scenario``: defaults, then --quick, then flags."""
    item = SCENARIOS[args.scenario]
    values: dict[str, Any] = dict(item.quick) if args.quick else {}
    for f in dataclasses.fields(item.options):
        given = getattr(args, f.name, None)
        if given not in (None, False):
            values[f.name] = given
    return item.options(**values)


async def run_scenario(args: argparse.Namespace, *, out: Any = None) -> dict[str, Any]:
    """Run ``args.scenario`` and return its report (what ``--json`` writes)."""
    out = out or sys.stdout
    configure_logging("WARNING")
    settings = load_settings(args.config) if args.config else load_settings()
    item = SCENARIOS[args.scenario]
    if args.plot_dir:
        require_matplotlib()
    report = await item.run(settings.amqp_url, scenario_options(args), out)
    report = {**report, "started_by": "hutch bench scenario " + item.name,
              "quick": bool(args.quick), "machine": machine()}
    if args.json_path:
        _write_json(Path(args.json_path), report)
        print(f"figures written to {args.json_path}", file=out)
    if args.plot_dir:
        for path in plot_report(report, Path(args.plot_dir)):
            print(f"plot written to {path}", file=out)
    return report


def cmd_scenario(args: argparse.Namespace) -> int:
    """``hutch bench scenario NAME``: 0 when it ran, whether or not targets were met
    (the figures are the result; CI does not gate on them)."""
    asyncio.run(run_scenario(args))
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    report = json.loads(Path(args.json_file).read_text())
    written = plot_report(report, Path(args.plot_dir))
    if not written:
        print(f"{args.json_file}: nothing to plot (no series or sweep)", file=sys.stderr)
        return 1
    for path in written:
        print(f"plot written to {path}")
    return 0


def machine() -> dict[str, Any]:
    """What the figures were measured on (they mean little without it)."""
    info: dict[str, Any] = {"python": platform.python_version(), "cpus": os.cpu_count(),
                            "platform": platform.platform()}
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                info["memory_gib"] = round(int(line.split()[1]) / 1024 / 1024, 1)
                break
    return info


def _write_json(path: Path, report: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    tmp.replace(path)


def cmd_bench(args: argparse.Namespace) -> int:
    """The ``hutch bench`` command: run, print the table, write ``--json``.

    Exits 0 once the run completed, whatever the error replies: overloading the system
    until it refuses requests is a legitimate benchmark, and the table reports them."""
    asyncio.run(run_bench(args))
    return 0


def _config(args: argparse.Namespace, settings: Settings) -> dict[str, Any]:
    return {
        "target": "embedded" if args.embedded else "configured",
        "broker": settings.redacted_amqp_url(), "prefix": settings.prefix,
        "rate": args.rate, "duration_s": args.duration, "arrival": args.arrival,
        "seed": args.seed, "models": _models(args.models),
        "model_choice": args.model_choice, "priority_mix": args.priority_mix,
        "prompt_words": args.prompt_words, "max_tokens": args.max_tokens,
        "timeout_s": args.timeout, "connections": args.connections,
        **({"mock_capacity": args.mock_capacity, "mock_latency_ms": args.mock_latency_ms}
           if args.embedded else {}),
    }


def _models(text: str) -> list[str]:
    models = [m.strip() for m in text.split(",") if m.strip()]
    if not models:
        raise ConfigError(f"--models {text!r}: no model given")
    return models


async def run_bench(args: argparse.Namespace, *, out: Any = None) -> dict[str, Any]:
    """Run a benchmark from parsed ``hutch bench`` arguments and return the report (the
    same dict ``--json`` writes). The table goes to ``out`` (stdout by default)."""
    out = out or sys.stdout
    classes = parse_priority_mix(args.priority_mix)
    models = _models(args.models)
    times = schedule(args.rate, args.duration, arrival=args.arrival, seed=args.seed)
    rng = random.Random(args.seed)
    plan = LoadPlan(
        times=times, classes=assign_classes(len(times), classes, seed=args.seed),
        models=[models[i % len(models)] if args.model_choice == "round-robin"
                else rng.choice(models) for i in range(len(times))],
        prompt_words=args.prompt_words, timeout_s=args.timeout, max_tokens=args.max_tokens)
    configure_logging("WARNING")
    settings = load_settings(args.config) if args.config else load_settings()

    async with contextlib.AsyncExitStack() as stack:
        if args.embedded:
            embedded = await stack.enter_async_context(embedded_hutch(
                settings.amqp_url, models=models, capacity=args.mock_capacity,
                latency_ms=args.mock_latency_ms))
            settings = embedded.settings
            client_ids = [f"{settings.prefix}-bench-{i}" for i in range(args.connections)]
            embedded.client_ids.extend(client_ids)
            clients = [HutchClient.from_settings(settings, client_id=cid)
                       for cid in client_ids]
        else:
            clients = [HutchClient.from_settings(settings) for _ in range(args.connections)]
        for client in clients:
            await stack.enter_async_context(client)
        config = _config(args, settings)
        print(f"bench: {len(times)} requests over {args.duration:g} s at {args.rate:g}/s "
              f"({args.arrival}), {args.connections} connection(s), broker "
              f"{config['broker']}, prefix {settings.prefix!r}", file=out)
        progress = Progress(len(times), args.duration, enabled=not args.no_progress)
        started_at = datetime.datetime.now(datetime.UTC).isoformat()
        records, elapsed = await run_load(clients, plan, progress=progress)

    summary = summarize(records, elapsed, [c.name for c in classes])
    report = {"config": config, "started_at": started_at,
              "priorities": {c.name: c.priority for c in classes}, **summary}
    for line in format_table(summary, report["priorities"]):
        print(line, file=out)
    if args.json_path:
        _write_json(Path(args.json_path), report)
        print(f"figures written to {args.json_path}", file=out)
    return report


def parse(argv: Sequence[str]) -> argparse.Namespace:
    """Parse ``hutch bench`` arguments without the full ``hutch`` parser (tests, scripts)."""
    parser = argparse.ArgumentParser(prog="hutch")
    sub = parser.add_subparsers(dest="command", required=True)

    def config_arg(p: argparse.ArgumentParser) -> None:
        p.add_argument("--config", "-c", required=True, help="TOML configuration file")

    add_cli(sub, config_arg)
    return parser.parse_args(["bench", *argv])
