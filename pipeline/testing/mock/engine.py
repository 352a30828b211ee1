"""The realistic engine: a KV budget, a FIFO waiting queue inside the server, a batch that
slows every token down as it grows, and (optionally) recompute preemption.

Why: a request queue in front of vLLM must learn that the server's capacity moves (short
requests fit more than long ones, a fuller batch is slower, beyond its budget the server
queues internally where Hutch's priorities cannot act). The fixed-slot mock cannot show
any of that; this engine does, deterministically enough for tests and benchmarks.

Each request is a :class:`Sequence`. :meth:`Engine.admit` queues it FIFO and returns once
it runs; :meth:`Engine.prefill` and :meth:`Engine.step` produce its tokens at the pace of
the current batch; :meth:`Engine.finish` frees its KV and admits whoever now fits.
Everything is counted in :class:`~pipeline.testing.mock.engine_metrics.EngineMetrics`.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from pipeline.testing.mock.engine_config import EngineConfig
from pipeline.testing.mock.engine_metrics import EngineMetrics

__all__ = ["Engine", "Sequence", "SequencePacer", "TooLongError"]


class TooLongError(ValueError):
    """A request that could never fit the KV budget, even alone (vLLM answers 400)."""


@dataclass(eq=False, slots=True)
class Sequence:
    """One request inside the engine: its size, progress and state."""

    prompt_tokens: int
    reply_tokens: int
    generated: int = 0
    preemptions: int = 0
    arrived: float = field(default_factory=time.monotonic)
    running: bool = False
    #: Set while the sequence runs; cleared when it waits (first admission or preempted).
    admitted: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def kv_held(self) -> int:
        """KV tokens it holds while running: its prompt and what it generated so far."""
        return self.prompt_tokens + self.generated

    @property
    def total_tokens(self) -> int:
        """Its whole length once finished."""
        return self.prompt_tokens + self.reply_tokens


class Engine:
    """Admission, pacing and preemption of one mock server (see :class:`EngineConfig`)."""

    def __init__(self, config: EngineConfig, metrics: EngineMetrics) -> None:
        self.config = config
        self.metrics = metrics
        self.waiting: deque[Sequence] = deque()
        #: Running sequences in admission order: the newest last (the preemption victim).
        self.running: list[Sequence] = []
        self.preemptions = 0
        metrics.bind(self)

    # -- state ------------------------------------------------------------------------------

    @property
    def kv_used(self) -> int:
        """KV tokens held by running sequences (prompt plus generated)."""
        return sum(seq.kv_held for seq in self.running)

    @property
    def kv_usage(self) -> float:
        """``kv_used`` over the budget, 0..1 (above 1 only just after a capacity cut)."""
        return self.kv_used / self.config.kv_tokens

    def _kv_reserved(self) -> int:
        """KV tokens promised to running sequences: whole lengths without preemption."""
        if self.config.preempt:
            return self.kv_used
        return sum(seq.total_tokens for seq in self.running)

    def _fits(self, seq: Sequence) -> bool:
        config = self.config
        if len(self.running) >= config.max_running:
            return False
        need = seq.kv_held + 1 if config.preempt else seq.total_tokens
        return self._kv_reserved() + need <= config.kv_tokens

    # -- lifecycle ---------------------------------------------------------------------------

    def sequence(self, prompt_tokens: int, reply_tokens: int) -> Sequence:
        """A new sequence; raises :class:`TooLongError` if it alone exceeds the budget."""
        total = prompt_tokens + reply_tokens
        if total > self.config.kv_tokens:
            raise TooLongError(
                f"this request needs {total} tokens ({prompt_tokens} in the prompt, "
                f"{reply_tokens} to generate); the server holds {self.config.kv_tokens}")
        return Sequence(prompt_tokens, reply_tokens)

    async def admit(self, seq: Sequence) -> None:
        """Queue ``seq`` FIFO and return once it runs (cancellable while waiting)."""
        self.waiting.append(seq)
        self._schedule()
        await seq.admitted.wait()

    def finish(self, seq: Sequence) -> None:
        """``seq`` is done or abandoned: free its place and admit whoever now fits."""
        if seq.running:
            self.running.remove(seq)
            seq.running = False
        elif seq in self.waiting:
            self.waiting.remove(seq)
        if seq.generated >= seq.reply_tokens:
            self.metrics.finished(time.monotonic() - seq.arrived)
        self._schedule()

    def reconfigure(self, config: EngineConfig) -> None:
        """New capacity at run time: running sequences keep running (a cut is absorbed as
        they finish, or by preemption when they grow); waiting ones are admitted if they
        now fit."""
        self.config = config
        self._schedule()

    def _schedule(self) -> None:
        while self.waiting and self._fits(self.waiting[0]):
            seq = self.waiting.popleft()
            seq.running = True
            self.running.append(seq)
            seq.admitted.set()

    def _preempt_newest(self) -> Sequence:
        victim = self.running.pop()
        victim.running = False
        victim.admitted.clear()
        victim.preemptions += 1
        self.preemptions += 1
        self.metrics.preempted()
        self.waiting.appendleft(victim)  # recomputed first, before newer arrivals
        return victim

    # -- pacing ------------------------------------------------------------------------------

    async def prefill(self, seq: Sequence, seconds: float) -> None:
        """The first token: ``seconds`` of prefill, then one token generated."""
        await self._token(seq, lambda: seconds)
        self.metrics.first_token(time.monotonic() - seq.arrived)

    async def step(self, seq: Sequence, jitter: Callable[[float], float]) -> None:
        """One more output token, at the pace of the batch (``jitter`` scales seconds)."""
        started = time.monotonic()
        await self._token(seq, lambda: jitter(self.config.tpot_s(len(self.running))))
        self.metrics.token_time(time.monotonic() - started)

    async def _token(self, seq: Sequence, seconds: Callable[[], float]) -> None:
        """Generate one token of ``seq``. Preempted meanwhile, it waits to run again and
        redoes that token (what it generated before is kept: recomputed, not lost)."""
        while True:
            if not seq.running:
                await seq.admitted.wait()
            if self.config.preempt and self.kv_used + 1 > self.config.kv_tokens:
                self._preempt_newest()
                continue
            seq.generated += 1  # its KV is taken now, so concurrent steps cannot overrun
            try:
                await asyncio.sleep(seconds())
            except BaseException:
                seq.generated -= 1
                raise
            if seq.running:
                return
            seq.generated -= 1  # preempted while it was being produced


class SequencePacer:
    """Paces one sequence's tokens through the engine, with the ``pause`` of
    :class:`~pipeline.testing.mock.stream.Pacer` so a stream is written the same way."""

    def __init__(self, engine: Engine, seq: Sequence, first_token_s: Callable[[], float],
                 jitter: Callable[[float], float]) -> None:
        self._engine = engine
        self._seq = seq
        self._first_token_s = first_token_s
        self._jitter = jitter

    async def pause(self, tokens_sent: int) -> None:
        """Produce the next token: the prefill for the first, a batch step after."""
        if self._seq.generated == 0:
            await self._engine.prefill(self._seq, self._first_token_s())
        else:
            await self._engine.step(self._seq, self._jitter)

    async def whole(self) -> None:
        """Produce every token of a reply that is not streamed (at least the prefill)."""
        await self.pause(0)
        while self._seq.generated < self._seq.reply_tokens:
            await self.pause(self._seq.generated)
