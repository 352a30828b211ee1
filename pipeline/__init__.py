"""Hutch: a request queue for LLM backends on RabbitMQ.

The public API: :class:`HutchClient` (send requests, read replies), :class:`Settings` and
:func:`load_settings` (the configuration), and every exception of :mod:`pipeline.errors`.
``HutchClient`` and the settings are imported on first use (PEP 562), so importing a
light part of the package, such as the command line, does not load aio-pika or pydantic.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from pipeline import errors
from pipeline.errors import *  # noqa: F403  (the exceptions are part of the API)

if TYPE_CHECKING:
    from pipeline.client.client import HutchClient
    from pipeline.settings import Settings, load_settings

__all__ = ["HutchClient", "Settings", "load_settings"]
__all__ += errors.__all__

#: The names imported on first use, and their modules.
_LAZY = {
    "HutchClient": "pipeline.client.client",
    "Settings": "pipeline.settings",
    "load_settings": "pipeline.settings",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
