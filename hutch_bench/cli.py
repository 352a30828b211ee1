"""``hutch bench``: the runs behind the command line of :mod:`hutch_bench.commands`.

``cmd_bench``, ``cmd_scenario`` and ``cmd_plot`` are what the commands call; ``run_bench``
and ``run_scenario`` return the report, for tests and scripts.
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
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hutch_bench.commands import register
from hutch_bench.loadgen import (
    LoadPlan,
    Progress,
    assign_classes,
    parse_priority_mix,
    run_load,
    schedule,
)
from hutch_bench.plots import plot_report, require_matplotlib
from hutch_bench.report import format_table, summarize
from hutch_bench.scenarios import SCENARIOS
from hutch_bench.stack import check_broker, on_broker
from pipeline.cli.common import add_subcommands
from pipeline.client.client import HutchClient
from pipeline.errors import ConfigError
from pipeline.observe.log import configure_logging
from pipeline.settings import Settings, load_settings
from pipeline.testing.embedded import embedded_hutch

__all__ = [
    "cmd_bench",
    "cmd_plot",
    "cmd_scenario",
    "machine",
    "parse",
    "run_bench",
    "run_scenario",
    "scenario_options",
]


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
    options = scenario_options(args)
    if item.on_user_broker:
        await check_broker(settings)
    with on_broker(settings):
        report = await item.run(settings.amqp_url, options, out)
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
    register(add_subcommands(parser, dest="command", required=True))
    return parser.parse_args(["bench", *argv])
