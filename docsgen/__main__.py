"""``python -m docsgen [--check]``: write the generated documentation, or check it."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from docsgen.regions import ROOT, replace_region

__all__ = ["main", "outputs"]

def _makers() -> dict[str, Callable[[str], str]]:
    """File -> a function of its current text that returns its generated text."""
    from docsgen.benchmarks import benchmark_summary
    from docsgen.cli import cli_reference
    from docsgen.configuration import configuration_tables
    from docsgen.example_toml import example_toml
    from docsgen.runbooks import rewrite_runbooks

    return {
        "docs/reference/configuration.md":
            lambda text: replace_region(text, "settings", configuration_tables()),
        "docs/reference/cli.md": lambda text: replace_region(text, "commands", cli_reference()),
        "docs/benchmarks.md":
            lambda text: replace_region(text, "benchmarks", benchmark_summary()),
        "hutch.example.toml": lambda _text: example_toml(),
        "deploy/prometheus/alerts.yml": rewrite_runbooks,
        "deploy/prometheus/alerts.test.yml": rewrite_runbooks,
    }


def outputs() -> dict[str, tuple[str, str]]:
    """File -> (its text now, the text it should have)."""
    found = {}
    for name, make in _makers().items():
        path = ROOT / name
        current = path.read_text() if path.exists() else ""
        found[name] = (current, make(current))
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m docsgen", description=__doc__)
    parser.add_argument("--check", action="store_true",
                        help="write nothing; exit 1 if a generated file is stale")
    args = parser.parse_args(argv)
    try:
        found = outputs()
    except ValueError as exc:  # a page without its markers, a runbook without its entry
        print(f"docsgen: {exc}", file=sys.stderr)
        return 2
    stale = {name: wanted for name, (current, wanted) in found.items() if current != wanted}
    if args.check:
        for name in stale:
            print(f"stale: {name} (run `python -m docsgen`)", file=sys.stderr)
        return 1 if stale else 0
    for name, wanted in stale.items():
        (ROOT / name).write_text(wanted)
        print(f"wrote {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
