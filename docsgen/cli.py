"""The command reference of ``docs/reference/cli.md``, from ``hutch``'s argument parser.

Every command and subcommand, in the order ``hutch --help`` lists them: its help line, its
description, its usage (as argparse prints it, at a fixed width) and a table of its
arguments with their defaults and choices. Lazily filled commands (the mock backend's,
the benchmark scenarios') are filled first, so their options are listed too.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator

from docsgen.regions import plain_text
from pipeline.cli.common import LazySubParsers
from pipeline.cli.main import build_parser

__all__ = ["cli_reference", "commands"]

#: The width argparse formats usage lines at (the terminal's would make the page vary).
WIDTH = 88


def _subcommands(parser: argparse.ArgumentParser
                 ) -> Iterator[tuple[str, str, argparse.ArgumentParser]]:
    """(name, help line, parser) of each subcommand of ``parser``."""
    for action in parser._actions:
        if not isinstance(action, argparse._SubParsersAction):
            continue
        if isinstance(action, LazySubParsers):
            for name in list(action.fills):
                action.fills.pop(name)(action.choices[name])
        helps = {choice.dest: choice.help or "" for choice in action._choices_actions}
        for name, sub in action.choices.items():
            yield name, helps.get(name, ""), sub


def commands(parser: argparse.ArgumentParser | None = None, path: tuple[str, ...] = ("hutch",)
             ) -> Iterator[tuple[tuple[str, ...], str, argparse.ArgumentParser]]:
    """Every command below ``parser``, depth first: (words, help line, parser)."""
    for name, help_line, sub in _subcommands(parser or build_parser()):
        yield (*path, name), help_line, sub
        yield from commands(sub, (*path, name))


def _expand(text: str | None, action: argparse.Action | None, prog: str) -> str:
    """A help text as argparse prints it (``%(default)s`` and friends filled in)."""
    if not text:
        return ""
    if action is None:  # a help line or a description: only %(prog)s and %%
        try:
            return text % {"prog": prog}
        except (KeyError, TypeError, ValueError):
            return text
    params = {**vars(action), "prog": prog}
    if params.get("choices") is not None:
        params["choices"] = ", ".join(str(c) for c in params["choices"])
    return text % params


def _names(action: argparse.Action) -> str:
    if action.option_strings:
        metavar = "" if action.nargs == 0 else " " + str(action.metavar or action.dest.upper())
        return ", ".join(f"`{option}{metavar}`" for option in action.option_strings)
    return f"`{action.metavar or action.dest}`"


def _default(action: argparse.Action) -> str:
    if action.required:
        return "required"
    if action.default is None or action.default is argparse.SUPPRESS or action.nargs == 0:
        return ""
    return f"`{action.default}`"


def _arguments(parser: argparse.ArgumentParser, prog: str) -> list[str]:
    rows = []
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction | argparse._SubParsersAction):
            continue
        text = _expand(action.help, action, prog)
        if action.choices is not None and "choices" not in (action.help or ""):
            text += " Choices: " + ", ".join(f"`{c}`" for c in action.choices) + "."
        rows.append(f"| {_names(action)} | {_default(action)} | {plain_text(text)} |")
    if not rows:
        return []
    return ["| Argument | Default | Meaning |", "|---|---|---|", *rows, ""]


def _usage(parser: argparse.ArgumentParser) -> str:
    formatter = argparse.HelpFormatter(parser.prog, width=WIDTH)
    formatter.add_usage(parser.usage, parser._actions, parser._mutually_exclusive_groups)
    lines = formatter.format_help().strip().removeprefix("usage: ").splitlines()
    indent = len("usage: ")
    return "\n".join([lines[0], *(line[indent:] for line in lines[1:])])


def cli_reference() -> str:
    """One section per command: heading, help line, description, usage, arguments."""
    parts = []
    for words, help_line, parser in commands():
        prog = " ".join(words)
        parts += [f"{'#' * min(len(words) + 1, 6)} `{prog}`", ""]
        if help_line:
            line = plain_text(_expand(help_line, None, prog))
            parts += [line[:1].upper() + line[1:] + ("" if line.endswith(".") else "."), ""]
        description = _expand(parser.description, None, prog)
        if description and description.rstrip(".") != _expand(help_line, None, prog).rstrip("."):
            parts += [plain_text(description), ""]
        parts += ["```text", _usage(parser), "```", ""]
        parts += _arguments(parser, prog)
    return "\n".join(parts)
