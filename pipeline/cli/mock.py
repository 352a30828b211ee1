"""``hutch mock-backend``: run the OpenAI-compatible mock backend.

Its options are the mock's own (:func:`pipeline.testing.mock.add_arguments`, shared
with ``python -m``); they are added only when the command is chosen, so ``hutch --help``
does not import the mock.
"""

from __future__ import annotations

import argparse

from pipeline.cli.common import Subparsers, add_lazy_parser

__all__ = ["register", "run"]


def register(sub: Subparsers) -> None:
    """Add ``mock-backend``."""
    mock = add_lazy_parser(sub, "mock-backend", _options,
                           help="run the OpenAI-compatible mock backend")
    mock.set_defaults(func=run)


def _options(parser: argparse.ArgumentParser) -> None:
    from pipeline.testing.mock import add_arguments

    add_arguments(parser)


def run(args: argparse.Namespace) -> int:
    """Serve until SIGINT/SIGTERM; 2 on a bad fault configuration."""
    from pipeline.testing.mock import run_from_args

    return run_from_args(args)
