"""What every command group of ``hutch`` shares: ``--config``, the exit codes, the settings
of a command, and subcommands whose options are defined next to heavy code.

A group module only describes its commands; it imports nothing heavy at module level (the
command bodies import what they run), so building the whole parser for ``hutch --help``
stays fast. tests/test_cli.py checks which modules that imports.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeAlias

if TYPE_CHECKING:
    from pipeline.settings import Settings

__all__ = [
    "EXIT_FAILED",
    "EXIT_USAGE",
    "Fill",
    "LazySubParsers",
    "Subparsers",
    "add_config",
    "add_lazy_parser",
    "add_subcommands",
    "non_negative",
    "settings_of",
]

#: ``hutch``'s exit codes besides 0: a usage or configuration error, a failure.
EXIT_USAGE = 2
EXIT_FAILED = 1

#: What a group's ``register(subparsers)`` receives.
Subparsers: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"
#: Adds a lazily defined command's options to its parser.
Fill = Callable[[argparse.ArgumentParser], None]

if TYPE_CHECKING:
    _SubParsersBase = argparse._SubParsersAction[argparse.ArgumentParser]
else:
    _SubParsersBase = argparse._SubParsersAction


class LazySubParsers(_SubParsersBase):
    """Subcommands some of whose options are added only when the command is chosen.

    A few commands take options defined next to heavy code (the mock backend's, each
    benchmark scenario's dataclass fields). Their parser is registered up front, with its
    help line, so ``hutch --help`` lists it; its options are filled in when the command
    line names it, so listing the commands never imports that code.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.fills: dict[str, Fill] = {}

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: str | Sequence[Any] | None, option_string: str | None = None
                 ) -> None:
        if isinstance(values, Sequence) and values and values[0] in self.fills:
            name = str(values[0])
            self.fills.pop(name)(self.choices[name])
        super().__call__(parser, namespace, values, option_string)


def add_subcommands(parser: argparse.ArgumentParser, **kwargs: Any) -> LazySubParsers:
    """``parser.add_subparsers(**kwargs)``, able to hold lazily filled commands."""
    sub = parser.add_subparsers(action=LazySubParsers, **kwargs)
    assert isinstance(sub, LazySubParsers)
    return sub


def add_lazy_parser(sub: Subparsers, name: str, fill: Fill, **kwargs: Any
                    ) -> argparse.ArgumentParser:
    """Register command ``name`` now (``kwargs`` as for ``add_parser``) and let ``fill``
    add its options once a command line names it. ``sub`` comes from
    :func:`add_subcommands`."""
    if not isinstance(sub, LazySubParsers):
        raise TypeError("a lazily filled command needs subcommands from add_subcommands()")
    parser = sub.add_parser(name, **kwargs)
    sub.fills[name] = fill
    return parser


def add_config(parser: argparse.ArgumentParser, *, required: bool = True) -> None:
    """The ``--config``/``-c`` option every command that reads settings takes."""
    parser.add_argument("--config", "-c", required=required,
                        help="TOML configuration file (HUTCH_* variables override it)")


def settings_of(args: argparse.Namespace) -> Settings:
    """The settings a command runs with: its ``--config`` file, then ``HUTCH_*``."""
    from pipeline.settings import load_settings

    return load_settings(args.config)


def non_negative(value: str) -> int:
    """An argparse type: an integer >= 0."""
    number = int(value)
    if number < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {number}")
    return number
