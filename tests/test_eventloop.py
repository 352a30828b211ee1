"""``--loop``: asyncio by default, uvloop on request (an extra), clear errors otherwise."""

from __future__ import annotations

import asyncio
import builtins
from typing import Any

import pytest

from pipeline.errors import ConfigError
from pipeline.runtime import eventloop


async def _loop_module() -> str:
    await asyncio.sleep(0)
    return type(asyncio.get_running_loop()).__module__


def test_asyncio_by_default_and_uvloop_on_request() -> None:
    assert eventloop.run(_loop_module()).startswith("asyncio")
    assert eventloop.run(_loop_module(), "uvloop").startswith("uvloop")


def test_errors_propagate() -> None:
    async def main() -> None:
        raise KeyError("boom")

    with pytest.raises(KeyError):
        eventloop.run(main(), "uvloop")


def test_unknown_or_missing_loop_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match="expected one of asyncio, uvloop"):
        eventloop.run(_loop_module(), "trio")
    real_import = builtins.__import__

    def no_uvloop(name: str, *args: Any, **kwargs: Any) -> Any:
        if name == "uvloop":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_uvloop)
    with pytest.raises(ConfigError, match=r"pip install 'hutch\[uvloop\]'"):
        eventloop.run(_loop_module(), "uvloop")
