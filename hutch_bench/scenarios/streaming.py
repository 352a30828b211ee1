"""Scenario ``streaming``: what does streaming through the broker cost, and does a cancel
reach the backend in time?

Three ways to stream the same answers from one streaming mock backend (time to first
token, inter-token latency, jitter), in one run on one broker:

* ``direct``: the generator reads the mock's server-sent events itself, with Hutch's own
  HTTP client and SSE reader: the floor;
* ``relay``: a minimal hand-written aio-pika relay (:mod:`hutch_bench.stream_baseline`)
  doing the same I/O, coalescing chunks as Hutch does;
* ``hutch``: ``HutchClient.chat_stream`` through a ``hutch worker`` process.

Four measurements: time to first token at a light load (open loop: ``hutch`` minus
``direct`` is what Hutch adds); a sweep of concurrent streams (closed loop, ``N`` streams
always in flight) up to the first step whose inter-token gap p99 reaches the limit, with
tokens/s, chunk messages/s at the broker and the worker's CPU per 1,000 tokens; and the
cancel latency, from the client's cancel publish to the mock seeing the connection close
(its ``/stats`` ``aborted_at``; both read the same monotonic clock).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from typing import Any, TextIO

from hutch_bench.loadgen import schedule
from hutch_bench.report import distribution
from hutch_bench.scenarios.common import (
    MODEL,
    Target,
    apply_hutch,
    format_targets,
    hutch_clients,
    print_lines,
    targets_report,
)
from hutch_bench.scenarios.stream_paths import (
    DirectPath,
    HutchPath,
    RelayPath,
    StreamPath,
    cancels,
    cpu_seconds,
    metric_total,
    open_loop_streams,
    run_step,
    step_figures,
)
from hutch_bench.stack import MockProcess, Stack, free_port
from hutch_bench.stream_baseline import READY_LINE, RelayClient
from pipeline.errors import ConfigError

__all__ = ["StreamingOptions", "run"]

PATHS = ("direct", "relay", "hutch")
#: Measured as the broker's chunk message rate; the worker counts what it published.
_MESSAGES_METRIC = "hutch_stream_messages_total"

#: What a path's probe reads before and after a step: chunk messages published so far
#: (None: no broker on that path) and its worker process's CPU seconds.
_Probe = Callable[[], Awaitable[tuple[float | None, float | None]]]


@dataclass(frozen=True)
class StreamingOptions:
    #: Concurrent streams of the sweep's steps, in order.
    concurrency: tuple[float, ...] = (10, 25, 50, 100, 200, 400, 800)
    step_s: float = 10.0
    #: Tokens per streamed answer in the sweep and the mock's pace.
    tokens: int = 50
    ttft_ms: float = 20.0
    itl_ms: float = 20.0
    jitter: float = 0.1
    #: Light load: streams per second (open loop), for how long, tokens each.
    light_rps: float = 10.0
    light_s: float = 20.0
    light_tokens: int = 16
    warmup_s: float = 2.0
    #: Cancels: how many, how many at once, the longest wait after the first token, and
    #: the length of the answers (long enough to be still streaming when cancelled).
    cancels: int = 200
    cancel_concurrency: int = 20
    cancel_hold_ms: float = 300.0
    cancel_tokens: int = 200
    #: A step is sustained when its inter-token gap p99 stays under this, without errors.
    gap_limit_ms: float = 100.0
    #: Coalescing of Hutch (``stream_window_ms``, ``stream_max_chunks``) and the relay.
    window_ms: int = 25
    max_chunks: int = 64
    seed: int = 1

    def __post_init__(self) -> None:
        if not self.concurrency or any(c < 1 for c in self.concurrency):
            raise ConfigError("--concurrency: a list of positive stream counts")
        if self.jitter >= 1:
            raise ConfigError(f"--jitter {self.jitter:g}: must be below 1")

    @property
    def steps(self) -> list[int]:
        return [int(c) for c in self.concurrency]

    def body(self, tokens: int) -> dict[str, Any]:
        return {"model": MODEL, "max_tokens": tokens,
                "messages": [{"role": "user", "content": "stream me a story"}]}


async def _start_mock(stack: Stack, options: StreamingOptions) -> MockProcess:
    top = max(options.steps)
    return await stack.mock(capacity=top + options.cancel_concurrency + 64,
                            latency_ms=options.ttft_ms, extra=[
        "--ttft-ms", f"{options.ttft_ms:g}", "--itl-ms", f"{options.itl_ms:g}",
        "--jitter", f"{options.jitter:g}", "--seed", str(options.seed),
        "--reply-tokens", str(options.tokens),
        "--ids-kept", str(max(1000, 2 * options.cancels))])


async def _start_hutch(stack: Stack, mock: MockProcess, options: StreamingOptions
                       ) -> tuple[Any, _Probe]:
    """The pool, one worker serving its metrics, and the probe reading both."""
    settings = await apply_hutch(stack, mock, capacity=max(options.steps), overrides={
        "stream_window_ms": options.window_ms, "stream_max_chunks": options.max_chunks})
    port = free_port()
    worker = await stack.worker(settings, extra=["--metrics-port", str(port)])
    await stack.wait_for_consumers(stack.names.triage_queue, 1)
    await stack.wait_for_consumers(stack.names.work_queue("bench"), 1)

    async def probe() -> tuple[float | None, float | None]:
        url = f"http://127.0.0.1:{port}/metrics"
        return await metric_total(url, _MESSAGES_METRIC), cpu_seconds(worker.pid)

    return settings, probe


async def _start_relay(stack: Stack, opened: contextlib.AsyncExitStack, amqp_url: str,
                       mock: MockProcess, options: StreamingOptions
                       ) -> tuple[RelayPath, _Probe]:
    queue = f"{stack.prefix}.relay"
    stack.queues.append(queue)
    relay = await stack.spawn("relay", "hutch_bench.stream_baseline", [
        "--amqp-url", amqp_url, "--queue", queue, "--backend-url", mock.url,
        "--prefetch", str(max(options.steps)), "--window-ms", str(options.window_ms),
        "--max-chunks", str(options.max_chunks)])
    await relay.wait_for_line(READY_LINE)
    client = await opened.enter_async_context(RelayClient(amqp_url, queue))

    async def probe() -> tuple[float | None, float | None]:
        return float(client.chunk_messages), cpu_seconds(relay.pid)

    return RelayPath(client), probe


async def _no_probe() -> tuple[float | None, float | None]:
    return None, None


@dataclass
class _Systems:
    mock: MockProcess
    paths: dict[str, StreamPath]
    probes: dict[str, _Probe]


async def _start(stack: Stack, opened: contextlib.AsyncExitStack, amqp_url: str,
                 options: StreamingOptions) -> _Systems:
    mock = await _start_mock(stack, options)
    settings, hutch_probe = await _start_hutch(stack, mock, options)
    relay, relay_probe = await _start_relay(stack, opened, amqp_url, mock, options)
    direct = DirectPath(mock.url, max(options.steps) + options.cancel_concurrency)
    opened.push_async_callback(direct.aclose)
    (client,) = await opened.enter_async_context(hutch_clients(stack, settings, 1))
    return _Systems(mock, {"direct": direct, "relay": relay, "hutch": HutchPath(client)},
                    {"direct": _no_probe, "relay": relay_probe, "hutch": hutch_probe})


def _costs(before: tuple[float | None, float | None], after: tuple[float | None, float | None],
           tokens: int, elapsed_s: float) -> dict[str, float | None]:
    """Chunk messages/s and worker CPU per 1,000 tokens between two probes."""
    (m0, c0), (m1, c1) = before, after
    return {
        "messages_per_s": None if m0 is None or m1 is None or elapsed_s <= 0
        else (m1 - m0) / elapsed_s,
        "worker_cpu_ms_per_1k_tokens": None if c0 is None or c1 is None or not tokens
        else (c1 - c0) * 1000 * 1000 / tokens,
    }


def _row_line(name: str, row: dict[str, Any]) -> str:
    gap, ttft = row["gap_ms"], row["ttft_ms"]
    messages, cpu = row["messages_per_s"], row["worker_cpu_ms_per_1k_tokens"]
    return (f"  {name:6s} {row['concurrency']:5d} streams  {row['tokens_per_s']:8.0f} tok/s"
            f"  gap p50 {gap['p50'] or 0:6.1f} p99 {gap['p99'] or 0:7.1f} ms"
            f"  ttft p99 {ttft['p99'] or 0:7.1f} ms"
            f"  msg/s {'-' if messages is None else f'{messages:.0f}':>6s}"
            f"  cpu/1k tok {'-' if cpu is None else f'{cpu:.0f} ms':>7s}"
            f"  errors {sum(row['errors'].values())}")


async def _sweep(path: StreamPath, probe: _Probe, options: StreamingOptions, out: TextIO
                 ) -> list[dict[str, Any]]:
    """Step the concurrency up until the gap p99 reaches the limit (or errors)."""
    body = options.body(options.tokens)
    stagger_s = min(options.step_s / 2,
                    (options.ttft_ms + options.tokens * options.itl_ms) / 1000)
    rows: list[dict[str, Any]] = []
    for concurrency in options.steps:
        before = await probe()
        records, elapsed = await run_step(path, body, concurrency, options.step_s, stagger_s)
        figures = step_figures(records, elapsed)
        row = {"concurrency": concurrency, **figures,
               **_costs(before, await probe(), figures["tokens"], elapsed)}
        row["sustained"] = (not row["errors"] and row["gap_ms"]["p99"] is not None
                            and row["gap_ms"]["p99"] < options.gap_limit_ms)
        rows.append(row)
        print(_row_line(path.name, row), file=out, flush=True)
        if not row["sustained"]:
            break
        await asyncio.sleep(0.5)
    return rows


async def _light(systems: _Systems, options: StreamingOptions) -> dict[str, Any]:
    """Time to first token per path at the light load (after a warm-up of each)."""
    body = options.body(options.light_tokens)
    figures: dict[str, Any] = {}
    for name in PATHS:
        path = systems.paths[name]
        await open_loop_streams(path, body, schedule(options.light_rps, options.warmup_s))
        times = schedule(options.light_rps, options.light_s)
        records = await open_loop_streams(path, body, times)
        figures[name] = step_figures(records, options.light_s)
    return figures


async def _cancel_latency(systems: _Systems, name: str, options: StreamingOptions
                          ) -> dict[str, Any]:
    """Cancel in-flight streams on one path; when the mock saw each abort."""
    await systems.mock.reset()
    sent = await cancels(systems.paths[name].cancel_one, options.body(options.cancel_tokens),
                         options.cancels, options.cancel_concurrency,
                         options.cancel_hold_ms / 1000, options.seed)
    await asyncio.sleep(0.5)  # an abort later than this fails the target anyway
    seen = (await systems.mock.stats())["aborted_at"]
    latencies = [(seen[rid] - at) * 1000 for rid, at in sent if rid in seen]
    return {"cancelled": len(sent), "seen_by_backend": len(latencies),
            "latency_ms": distribution(latencies)}


async def _measure(amqp_url: str, options: StreamingOptions, out: TextIO) -> dict[str, Any]:
    async with Stack(amqp_url) as stack, contextlib.AsyncExitStack() as opened:
        systems = await _start(stack, opened, amqp_url, options)
        light = await _light(systems, options)
        sweep = {name: await _sweep(systems.paths[name], systems.probes[name], options, out)
                 for name in PATHS}
        cancel = {name: await _cancel_latency(systems, name, options)
                  for name in ("direct", "hutch")}
    return {"light_load": light, "stream_sweep": sweep, "cancel": cancel}


def _best(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The highest sustained step (the sweep stops at the first one that is not)."""
    sustained = [row for row in rows if row["sustained"]]
    return sustained[-1] if sustained else None


def _targets(added: dict[str, float], best: dict[str, int], cancel: dict[str, Any]
             ) -> list[Target]:
    ratio = best["hutch"] / best["relay"] if best["relay"] else 0.0
    hutch = cancel["hutch"]
    p99 = hutch["latency_ms"]["p99"]
    all_seen = hutch["seen_by_backend"] == hutch["cancelled"]
    return [
        Target("added time to first token p50 < 3 ms (light load)",
               f"{added.get('p50', float('nan')):.2f} ms", added.get("p50", 99) < 3),
        Target("added time to first token p99 < 10 ms (light load)",
               f"{added.get('p99', float('nan')):.2f} ms", added.get("p99", 99) < 10),
        Target("Hutch sustains >= 0.7x the relay's concurrent streams",
               f"{best['hutch']} vs {best['relay']} streams = {ratio:.2f}x", ratio >= 0.7),
        Target("cancel reaches the backend within 50 ms p99",
               f"p99 {p99 if p99 is not None else float('nan'):.1f} ms, "
               f"{hutch['seen_by_backend']} of {hutch['cancelled']} seen",
               all_seen and p99 is not None and p99 < 50),
    ]


def _print(report: dict[str, Any], options: StreamingOptions, out: TextIO) -> None:
    print(f"light load, {options.light_rps:g} streams/s of {options.light_tokens} tokens, "
          "time to first token (ms):", file=out)
    for name in PATHS:
        light = report["light_load"][name]
        d = light["ttft_ms"]
        print(f"  {name:6s} p50 {d['p50'] or 0:7.2f}  p95 {d['p95'] or 0:7.2f}  "
              f"p99 {d['p99'] or 0:7.2f}  max {d['max'] or 0:7.2f}  "
              f"streams {light['completed']} of {light['streams']}", file=out)
    for name, best in report["max_sustained_streams"].items():
        row = report["at_max_sustained"][name]
        extra = "" if row is None else "".join(
            f", {label} {row[key]:.0f}" for key, label in (
                ("messages_per_s", "chunk messages/s"),
                ("worker_cpu_ms_per_1k_tokens", "worker CPU ms per 1k tokens"))
            if row[key] is not None)
        print(f"max sustained: {name} {best} streams{extra}", file=out)
    for name, figures in report["cancel"].items():
        d = figures["latency_ms"]
        print(f"cancel -> backend abort, {name}: p50 {d['p50'] or 0:.1f} p99 "
              f"{d['p99'] or 0:.1f} max {d['max'] or 0:.1f} ms, "
              f"{figures['seen_by_backend']} of {figures['cancelled']} seen", file=out)


async def run(amqp_url: str, options: StreamingOptions, out: TextIO) -> dict[str, Any]:
    print(f"streaming: mock ttft {options.ttft_ms:g} ms, itl {options.itl_ms:g} ms, "
          f"jitter {options.jitter:g}; sweep {', '.join(map(str, options.steps))} streams "
          f"of {options.tokens} tokens, {options.step_s:g} s each; coalescing "
          f"{options.window_ms} ms / {options.max_chunks} chunks", file=out, flush=True)
    measured = await _measure(amqp_url, options, out)
    ttft = {name: measured["light_load"][name]["ttft_ms"] for name in PATHS}
    added = {k: ttft["hutch"][k] - ttft["direct"][k] for k in ("p50", "p99")
             if ttft["hutch"][k] is not None and ttft["direct"][k] is not None}
    at_best = {name: _best(rows) for name, rows in measured["stream_sweep"].items()}
    best = {name: row["concurrency"] if row else 0 for name, row in at_best.items()}
    targets = _targets(added, best, measured["cancel"])
    report: dict[str, Any] = {
        "scenario": "streaming",
        "title": "Inter-token gap p99 vs concurrent streams (streaming mock backend)",
        "config": {**asdict(options), "concurrency": options.steps},
        **measured,
        "added_ttft_ms": added,
        "max_sustained_streams": best,
        "at_max_sustained": at_best,
        "hutch_to_relay": best["hutch"] / best["relay"] if best["relay"] else 0.0,
        "targets": targets_report(targets),
    }
    _print(report, options, out)
    print_lines(["targets:", *format_targets(targets)], out)
    return report
