"""The summary of ``docs/benchmarks.md``: sections copied from ``BENCHMARKS.md``.

``BENCHMARKS.md`` (repository root, beside its plots and raw results) stays the record of
every run; the docs page repeats its results table and its machine, so the site shows the
figures without a second copy to keep up by hand.
"""

from __future__ import annotations

import re

from docsgen.regions import ROOT

__all__ = ["COPIED", "benchmark_summary"]

#: The ``## `` sections of BENCHMARKS.md the page repeats, in this order.
COPIED = ("Results against the targets", "The machine")


def _section(text: str, title: str) -> str:
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", text, re.M | re.S)
    if match is None:
        raise ValueError(f"BENCHMARKS.md has no section '## {title}'")
    return match.group(1).strip()


def benchmark_summary() -> str:
    """The copied sections, each under its own ``##`` heading."""
    text = (ROOT / "BENCHMARKS.md").read_text()
    return "\n\n".join(f"## {title}\n\n{_section(text, title)}" for title in COPIED)
