"""The open-loop load generator behind ``hutch bench``.

Open loop: every send time is fixed before the run starts (constant ``i / rate`` or a
Poisson process), and each request is fired at its time whether or not earlier ones have
been answered. A closed loop (send the next when one returns) slows down with the system
and so hides its tail; here a slow system shows up as latency, measured from the
*intended* send time (coordinated omission is not possible by construction).
"""

from __future__ import annotations

import asyncio
import math
import random
import re
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TextIO

from hutch_bench.report import RequestRecord
from pipeline.errors import ConfigError, RequestFailed

__all__ = [
    "DEFAULT_CLASS_PRIORITIES",
    "LoadClient",
    "LoadPlan",
    "PriorityClass",
    "Progress",
    "assign_classes",
    "build_prompt",
    "parse_priority_mix",
    "run_load",
    "schedule",
]

#: Priorities of the class names that need no explicit ``name:priority``.
DEFAULT_CLASS_PRIORITIES = {"high": 9, "medium": 5, "normal": 5, "low": 0}

_ENTRY = re.compile(r"^(?P<name>[A-Za-z_][\w-]*)(?::(?P<priority>[^=]*))?=(?P<share>.*)$")


@dataclass(frozen=True)
class PriorityClass:
    """A named share of the requests, all sent with one AMQP priority."""

    name: str
    priority: int
    share: float


def parse_priority_mix(text: str) -> list[PriorityClass]:
    """Parse ``high=0.1,low=0.9`` or ``urgent:9=0.1,bulk:0=0.9``.

    Names in :data:`DEFAULT_CLASS_PRIORITIES` may omit the priority. Shares must be
    positive and add up to 1 (within 0.001): a mix that silently renormalised a typo would
    benchmark something else than asked. Raises :class:`ConfigError` naming the entry.
    """
    classes: list[PriorityClass] = []
    entries = [e.strip() for e in text.split(",")]
    if not text.strip() or any(not e for e in entries):
        raise ConfigError(f"priority mix {text!r}: empty entry; expected e.g. "
                          "'high=0.1,low=0.9' or 'urgent:9=0.1,bulk:0=0.9'")
    for entry in entries:
        match = _ENTRY.match(entry)
        if match is None:
            raise ConfigError(f"priority mix entry {entry!r}: expected NAME=SHARE or "
                              "NAME:PRIORITY=SHARE")
        name, prio_text, share_text = match["name"], match["priority"], match["share"]
        if prio_text is None:
            if name not in DEFAULT_CLASS_PRIORITIES:
                known = ", ".join(DEFAULT_CLASS_PRIORITIES)
                raise ConfigError(f"priority mix entry {entry!r}: unknown class {name!r} "
                                  f"without a priority; use {name}:PRIORITY=SHARE or one "
                                  f"of {known}")
            priority = DEFAULT_CLASS_PRIORITIES[name]
        else:
            try:
                priority = int(prio_text)
            except ValueError:
                raise ConfigError(f"priority mix entry {entry!r}: priority {prio_text!r} "
                                  "is not an integer") from None
            if not 0 <= priority <= 255:
                raise ConfigError(f"priority mix entry {entry!r}: priority {priority} "
                                  "is not in 0..255")
        try:
            share = float(share_text)
        except ValueError:
            raise ConfigError(f"priority mix entry {entry!r}: share {share_text!r} is not "
                              "a number") from None
        if not (share > 0 and math.isfinite(share)):
            raise ConfigError(f"priority mix entry {entry!r}: share must be positive")
        if any(c.name == name for c in classes):
            raise ConfigError(f"priority mix entry {entry!r}: class {name!r} given twice")
        classes.append(PriorityClass(name, priority, share))
    total = sum(c.share for c in classes)
    if abs(total - 1.0) > 1e-3:
        raise ConfigError(f"priority mix {text!r}: shares add up to {total:g}, not 1")
    return classes


def schedule(rate: float, duration_s: float, *, arrival: str = "constant",
             seed: int | None = None) -> list[float]:
    """Intended send times (seconds from the start, ascending, all < ``duration_s``).

    ``constant``: ``i / rate``. ``poisson``: cumulative exponential gaps of mean
    ``1 / rate`` from a generator seeded with ``seed``, so a run can be repeated exactly.
    Computed up front: the send times must not depend on how the system responds.
    """
    if rate <= 0 or not math.isfinite(rate):
        raise ConfigError(f"rate must be a positive number of requests/s, got {rate}")
    if duration_s <= 0 or not math.isfinite(duration_s):
        raise ConfigError(f"duration must be positive, got {duration_s}")
    if arrival == "constant":
        return [i / rate for i in range(math.ceil(rate * duration_s - 1e-9))]
    if arrival == "poisson":
        rng = random.Random(seed)
        times: list[float] = []
        t = rng.expovariate(rate)
        while t < duration_s:
            times.append(t)
            t += rng.expovariate(rate)
        return times
    raise ConfigError(f"arrival must be 'constant' or 'poisson', got {arrival!r}")


def assign_classes(count: int, classes: Sequence[PriorityClass], *,
                   seed: int | None = None) -> list[PriorityClass]:
    """A class for each of ``count`` requests: exact shares (largest remainder), in a
    seeded random order, so small runs still get the asked mix and classes interleave."""
    quotas = [c.share * count for c in classes]
    counts = [math.floor(q) for q in quotas]
    by_remainder = sorted(range(len(classes)), key=lambda i: quotas[i] - counts[i],
                          reverse=True)
    for i in by_remainder[:count - sum(counts)]:
        counts[i] += 1
    out = [c for c, n in zip(classes, counts, strict=True) for _ in range(n)]
    random.Random(seed).shuffle(out)
    return out


def build_prompt(index: int, words: int) -> str:
    """A prompt of ``words`` words; the index makes every request's body distinct."""
    return " ".join([f"bench-{index}", *(["lorem"] * max(0, words - 1))])


class _Reply(Protocol):
    @property
    def queue_wait_ms(self) -> int | None: ...


class LoadClient(Protocol):
    """What the generator drives: :class:`~pipeline.client.client.HutchClient`, and the
    benchmark's baselines (a direct HTTP call, a minimal aio-pika RPC), so every path is
    measured by the same code. ``result`` raises :class:`RequestFailed` for an error
    reply."""

    async def submit(self, body: dict[str, Any], *, model: str, priority: int = 0,
                     timeout: float = 60.0) -> str: ...

    async def result(self, correlation_id: str) -> _Reply: ...


@dataclass
class LoadPlan:
    """Everything a run sends: when, to which model, with what priority and prompt size."""

    times: list[float]
    classes: list[PriorityClass]
    models: list[str]
    prompt_words: int = 16
    timeout_s: float = 60.0
    max_tokens: int | None = None

    def body(self, index: int) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self.models[index],
            "messages": [{"role": "user", "content": build_prompt(index, self.prompt_words)}],
        }
        if self.max_tokens is not None:
            body["max_tokens"] = self.max_tokens
        return body


class Progress:
    """A one-line progress display on a terminal: sent/answered/errors, elapsed.

    Rewritten in place with ``\\r`` a few times a second; off when the stream is not a
    TTY (a log file should not fill with carriage returns) or when disabled.
    """

    def __init__(self, total: int, duration_s: float, *, stream: TextIO | None = None,
                 enabled: bool = True) -> None:
        self.stream = stream or sys.stderr
        self.enabled = enabled and self.stream.isatty()
        self.total = total
        self.duration_s = duration_s
        self.sent = self.answered = self.errors = 0
        self._started = time.monotonic()
        self._width = 0

    def render(self) -> str:
        elapsed = time.monotonic() - self._started
        done = self.answered + self.errors
        filled = int(20 * done / self.total) if self.total else 20
        return (f"[{'#' * filled}{'.' * (20 - filled)}] sent {self.sent}/{self.total}  "
                f"answered {self.answered}  errors {self.errors}  "
                f"in flight {self.sent - done}  {elapsed:5.1f}s/{self.duration_s:g}s")

    def update(self) -> None:
        if self.enabled:
            line = self.render()
            self.stream.write("\r" + line.ljust(self._width))
            self.stream.flush()
            self._width = len(line)

    def close(self) -> None:
        if self.enabled:
            self.update()
            self.stream.write("\n")
            self.stream.flush()

    async def run(self, interval_s: float = 0.2) -> None:
        while True:
            self.update()
            await asyncio.sleep(interval_s)


class _Run:
    """One run's shared state: the clock, the clients and the progress display."""

    def __init__(self, clients: Sequence[LoadClient], plan: LoadPlan,
                 progress: Progress | None) -> None:
        self.clients = clients
        self.plan = plan
        self.progress = progress
        self.loop = asyncio.get_running_loop()
        self.start = self.loop.time()
        self.last_done = self.start

    async def fire(self, record: RequestRecord) -> None:
        """Send one request, wait for its answer, and fill in its record."""
        client = self.clients[record.index % len(self.clients)]
        record.sent_s = self.loop.time() - self.start
        if self.progress is not None:
            self.progress.sent += 1
        try:
            cid = await client.submit(self.plan.body(record.index), model=record.model,
                                      priority=record.priority, timeout=self.plan.timeout_s)
            reply = await client.result(cid)
        except RequestFailed as exc:
            record.error = exc.code
        except asyncio.CancelledError:
            record.error = "cancelled"
            raise
        except Exception as exc:  # a benchmark reports failures, it does not stop on them
            record.error = type(exc).__name__
        else:
            record.queue_wait_ms = reply.queue_wait_ms
        self._done(record)

    def _done(self, record: RequestRecord) -> None:
        now = self.loop.time()
        record.done_s = now - self.start
        self.last_done = max(self.last_done, now)
        if record.error is None:
            record.latency_s = record.done_s - record.intended_s
        if self.progress is not None:
            if record.error is None:
                self.progress.answered += 1
            else:
                self.progress.errors += 1

    async def send_all(self, records: list[RequestRecord],
                       tasks: list[asyncio.Task[None]]) -> None:
        """Spawn each request at its intended time, then wait for all (bounded)."""
        for record in records:
            delay = self.start + record.intended_s - self.loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(self.fire(record)))
        if not tasks:
            return
        _, pending = await asyncio.wait(tasks, timeout=self.plan.timeout_s + 10)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        for record in records:
            if record.sent_s is not None and record.done_s is None:
                record.error = "cancelled"


async def run_load(clients: Sequence[LoadClient], plan: LoadPlan, *,
                   progress: Progress | None = None,
                   on_start: Callable[[], Awaitable[None]] | None = None,
                   ) -> tuple[list[RequestRecord], float]:
    """Fire every request of ``plan`` at its intended time, spread round-robin over
    ``clients``; return one record per request and the elapsed time (first intended send
    to last answer).

    The scheduler only sleeps until the next send time and spawns a task: it never awaits
    a request, so a slow reply cannot delay later sends. Every request ends: ``result``
    gives up at its deadline plus a grace period, and anything still open after that is
    cancelled and counted as ``cancelled``.
    """
    records = [RequestRecord(i, c.name, c.priority, plan.models[i], t)
               for i, (t, c) in enumerate(zip(plan.times, plan.classes, strict=True))]
    if on_start is not None:
        await on_start()
    run = _Run(clients, plan, progress)
    progress_task = asyncio.create_task(progress.run()) if progress is not None else None
    tasks: list[asyncio.Task[None]] = []
    try:
        await run.send_all(records, tasks)
    finally:
        for task in tasks:  # interrupted (Ctrl-C): leave nothing running
            if not task.done():
                task.cancel()
        if progress_task is not None:
            progress_task.cancel()
            await asyncio.gather(progress_task, return_exceptions=True)
        if progress is not None:
            progress.close()
    return records, max(run.last_done - run.start, 1e-9)
