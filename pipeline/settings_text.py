"""Settings as text: the one-line-per-key error report and the TOML dump.

Kept apart from :mod:`pipeline.settings` (the model) because neither is needed to
validate: one turns pydantic's errors into what an operator reads, the other writes a
file a child process reads back.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Collection
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from pydantic import ValidationError

from pipeline.gateway.settings import gateway_toml

if TYPE_CHECKING:
    from pipeline.settings import Settings

__all__ = ["dump_toml", "environment_keys", "format_errors", "redact_url"]


def environment_keys(env_prefix: str, fields: Collection[str], overrides: dict[str, Any]
                     ) -> dict[str, list[str]]:
    """Top-level key -> the ``HUTCH_*`` variables that set it, where the environment wins
    (not overridden by an argument). Matched as pydantic-settings does: ignoring case,
    ``HUTCH_POOLS__0__NAME`` setting ``pools``."""
    env_prefix = env_prefix.lower()
    found: dict[str, list[str]] = {}
    for variable in sorted(os.environ):
        name = variable.lower()
        if not name.startswith(env_prefix):
            continue
        key = name[len(env_prefix):].split("__", 1)[0]
        if key in fields and key not in overrides:
            found.setdefault(key, []).append(variable)
    return found


def format_errors(error: ValidationError, source: str,
                  environment: dict[str, list[str]]) -> str:
    """One line per bad key; a key the environment set names its variable, so
    ``HUTCH_MAX_PRIORITY=abc`` is not blamed on the file."""
    lines: list[str] = []
    blamed: list[str] = []
    for item in error.errors():
        key = ".".join(str(part) for part in item["loc"])
        message = item["msg"]
        if item["type"] == "extra_forbidden":
            message = "unknown key (check its spelling)"
        # Model validators report their own dotted key at the start of the message.
        message = re.sub(r"^(Value|Assertion) error, ", "", message)
        variables = environment.get(re.split(r"[.:]", key or message, maxsplit=1)[0], [])
        if variables:
            message += f" (set by the environment: {', '.join(variables)})"
            blamed += [v for v in variables if v not in blamed]
        lines.append(f"  {key}: {message}" if key else f"  {message}")
    if blamed:
        source += f", overridden by {', '.join(blamed)}"
    return "\n".join([f"invalid configuration ({source}):", *lines])


def dump_toml(settings: Settings) -> str:
    """The settings as a TOML file :func:`~pipeline.settings.load_settings` reads back to
    equal settings.

    For tools that start ``hutch`` processes (the benchmark scenarios, tests): a child
    process gets exactly the configuration its parent validated. Includes the credentials
    of ``amqp_url``: write it where only its owner can read it.
    """

    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, int | float):
            return repr(v)
        if isinstance(v, list):
            return "[" + ", ".join(value(x) for x in v) + "]"
        if isinstance(v, dict):  # an inline table (tenants, a pool's scheduling)
            return "{" + ", ".join(f"{json.dumps(k)} = {value(x)}" for k, x in v.items()) + "}"
        return json.dumps(str(v), ensure_ascii=False)  # a JSON string is a valid TOML basic string

    data = settings.model_dump(mode="json", exclude_none=True)
    lines = [f"{k} = {value(v)}" for k, v in data.items() if k not in ("pools", "gateway")]
    lines += gateway_toml(data["gateway"])
    for pool in data["pools"]:
        lines += ["", "[[pools]]"]
        lines += [f"{k} = {value(v)}" for k, v in pool.items() if k != "backends"]
        for backend in pool["backends"]:
            lines += ["", "[[pools.backends]]"]
            lines += [f"{k} = {value(v)}" for k, v in backend.items()]
    return "\n".join(lines) + "\n"


def redact_url(url: str) -> str:
    """``url`` without its password, for logs and messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = f"{parts.username}:***@{parts.hostname}"
    if parts.port:
        netloc += f":{parts.port}"
    return parts._replace(netloc=netloc).geturl()
