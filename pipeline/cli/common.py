"""What every command group of ``hutch`` shares: ``--config``, the exit codes, the settings
of a command, and subcommands whose options are defined next to heavy code.

A group module only describes its commands; it imports nothing heavy at module level (the
command bodies import what they run), so building the whole parser for ``hutch --help``
stays fast. tests/test_cli.py checks which modules that imports.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeAlias

if TYPE_CHECKING:
    from pipeline.settings import Settings

__all__ = [
    "EXIT_FAILED",
    "EXIT_USAGE",
    "LOG_LEVELS",
    "Fill",
    "LazySubParsers",
    "Subparsers",
    "add_config",
    "add_lazy_parser",
    "add_log_level",
    "add_subcommands",
    "int_range",
    "non_negative",
    "positive_float",
    "settings_of",
]

#: ``hutch``'s exit codes besides 0: a usage or configuration error, a failure.
EXIT_USAGE = 2
EXIT_FAILED = 1
#: What ``--log-level`` accepts (Python's level names; any case).
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")

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


def add_log_level(parser: argparse.ArgumentParser) -> None:
    """``--log-level`` of the long-running commands (JSON lines on stderr)."""
    parser.add_argument("--log-level", type=str.upper, choices=LOG_LEVELS, default="INFO",
                        help="lowest level of the JSON log lines on stderr (default INFO; "
                             "DEBUG adds a line per request, with its correlation id)")


def settings_of(args: argparse.Namespace) -> Settings:
    """The settings a command runs with: its ``--config`` file (if any), then ``HUTCH_*``;
    a ``HUTCH_*`` variable that names no setting is warned about on stderr."""
    from pipeline.settings import load_settings
    from pipeline.settings_env import unknown_environment
    from pipeline.settings_text import redact_url

    settings = load_settings(getattr(args, "config", None))
    # For `hutch`'s error lines: which broker a topology error is about.
    args.broker_urls = ", ".join(redact_url(url) for url in settings.amqp_nodes())
    referenced = [backend.api_key_env for pool in settings.pools for backend in pool.backends]
    referenced += [key.key_env for key in settings.gateway.keys]
    for line in unknown_environment(type(settings).model_fields, referenced):
        print(f"hutch: warning: {line}", file=sys.stderr)
    return settings


def int_range(low: int, high: int) -> Callable[[str], int]:
    """An argparse type: an integer within ``low..high``."""
    def parse(value: str) -> int:
        try:
            number = int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {value!r}") from None
        if not low <= number <= high:
            raise argparse.ArgumentTypeError(f"must be within {low}..{high}, got {number}")
        return number
    return parse


def positive_float(value: str) -> float:
    """An argparse type: a number > 0 (a deadline, a timeout)."""
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {value!r}") from None
    if not number > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return number


def non_negative(value: str) -> int:
    """An argparse type: an integer >= 0."""
    number = int(value)
    if number < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {number}")
    return number
