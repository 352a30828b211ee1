"""Drive Hypothesis against a live rig: examples are drawn in a thread, each batch runs on
the rig's event loop (one worker for the whole run, never one per example).

The CI run is derandomized (a fixed seed set: the same examples every time) and raises at
the first problem, so Hypothesis shrinks it to a small failing batch; the benchmark draws
fresh seeds, never stops, and counts.
"""

from __future__ import annotations

import asyncio
import warnings
from collections.abc import Callable, Coroutine
from typing import Any, Protocol

from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st
from hypothesis.errors import HypothesisDeprecationWarning

__all__ = ["Checker", "check_examples"]


class Checker(Protocol):
    """What a rig offers the driver: a strategy and a check that returns problems."""

    stall_s: float

    def strategy(self) -> st.SearchStrategy[Any]: ...

    def check(self, example: Any) -> Coroutine[Any, Any, list[str]]: ...


def check_examples(checker: Checker, loop: asyncio.AbstractEventLoop, *, examples: int,
                   derandomize: bool = True, seed_value: int | None = None,
                   raise_on_problem: bool = True,
                   on_example: Callable[[list[str]], None] | None = None) -> None:
    """Run ``examples`` Hypothesis examples of ``checker`` (call from a thread other than
    ``loop``'s). With ``raise_on_problem`` the first problem fails (and is shrunk)."""
    phases = [Phase.explicit, Phase.generate, Phase.shrink] if raise_on_problem else [
        Phase.generate]

    @settings(max_examples=examples, derandomize=derandomize and seed_value is None,
              database=None, deadline=None, phases=phases, print_blob=False,
              suppress_health_check=list(HealthCheck))
    @given(checker.strategy())
    def run(example: Any) -> None:
        future = asyncio.run_coroutine_threadsafe(checker.check(example), loop)
        problems = future.result(timeout=checker.stall_s * 4)
        if on_example is not None:
            on_example(problems)
        if raise_on_problem:
            assert not problems, f"{len(problems)} problems:\n" + "\n".join(problems[:20])

    if seed_value is not None:
        run = seed(seed_value)(run)
    with warnings.catch_warnings():
        # The rig's event loop (aio-pika) uses ``random`` in another thread while examples
        # are drawn; Hypothesis takes that for a strategy using it.
        warnings.filterwarnings("ignore", "Do not use the `random` module",
                                HypothesisDeprecationWarning)
        run()
