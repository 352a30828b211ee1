"""Where settings come from besides the model: the TOML file and the ``HUTCH_*`` variables.

Kept apart from :mod:`pipeline.settings` (the model) so that reading them can say what is
wrong in one line: a file that is a directory, a ``HUTCH_POOLS`` that is not JSON, a
``HUTCH_AMQP_URLS`` given as one plain URL (a list variable accepts one URL or a
comma-separated list, as well as JSON), a misspelt ``HUTCH_*`` name that would otherwise
be silently ignored.
"""

from __future__ import annotations

import difflib
import os
import tomllib
from collections.abc import Collection, Iterable
from pathlib import Path
from typing import Any

from pydantic.fields import FieldInfo
from pydantic_settings import EnvSettingsSource

from pipeline.errors import ConfigError

__all__ = ["OTHER_VARIABLES", "HutchEnvSource", "read_config_file", "unknown_environment"]

#: ``HUTCH_*`` variables that are not settings: read by scripts, tests and benchmarks.
OTHER_VARIABLES = frozenset({"HUTCH_NODES_DIR", "HUTCH_LITELLM_BIN", "HUTCH_WHEEL_CACHE",
                             "HUTCH_REAL_TESTS", "HUTCH_GATEWAY_DEMO_KEY"})


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The TOML file's contents; a :class:`ConfigError` naming the file otherwise."""
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"configuration file not found: {path}") from None
    except IsADirectoryError:
        raise ConfigError(f"--config {path} is a directory: give the TOML file in it "
                          "(e.g. hutch.toml)") from None
    except OSError as exc:
        raise ConfigError(f"configuration file {path} cannot be read: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not valid TOML: not UTF-8 text") from None


class HutchEnvSource(EnvSettingsSource):
    """pydantic-settings' environment source, with one-line errors and plain lists.

    A list-of-strings setting (``HUTCH_AMQP_URLS``, ``HUTCH_TRUSTED_USERS``) takes JSON, one
    value, or a comma-separated list; any other structured variable (``HUTCH_POOLS``) must
    be JSON, and if it is not, the error names the variable instead of a traceback.
    """

    def decode_complex_value(self, field_name: str, field: FieldInfo, value: Any) -> Any:
        if (isinstance(value, str) and field is not None and field.annotation == list[str]
                and not value.lstrip().startswith("[")):
            return [item.strip() for item in value.split(",") if item.strip()]
        try:
            return super().decode_complex_value(field_name, field, value)
        except ValueError as exc:
            variable = f"{self.env_prefix}{field_name}".upper()
            if field_name not in self.settings_cls.model_fields:
                variable = f"a {self.env_prefix.upper()}*__{field_name.upper()} variable"
            raise ConfigError(f"{variable}: not valid JSON ({exc}); a structured setting "
                              "takes JSON in the environment, e.g. HUTCH_POOLS='[{\"name\": "
                              "\"chat\", ...}]', or set it in the --config file") from None


def unknown_environment(fields: Collection[str], referenced: Iterable[str | None],
                        prefix: str = "HUTCH_") -> list[str]:
    """One warning per ``HUTCH_*`` variable that names no setting (a misspelling is
    otherwise ignored without a word). ``referenced``: variables the settings name
    (a backend's ``api_key_env``, a gateway key's ``key_env``), which are not settings."""
    known = {f"{prefix}{name}".upper() for name in fields}
    skip = OTHER_VARIABLES | {name for name in referenced if name}
    out = []
    for variable in sorted(os.environ):
        upper = variable.upper()
        if not upper.startswith(prefix) or variable in skip:
            continue
        if upper.split("__", 1)[0] in known:
            continue
        close = difflib.get_close_matches(upper.split("__", 1)[0], sorted(known), n=1)
        hint = f"; did you mean {close[0]}?" if close else ""
        out.append(f"{variable} is not a Hutch setting and is ignored{hint}")
    return out
