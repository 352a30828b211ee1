"""Tests against real OpenAI-compatible servers: LiteLLM's proxy and llama.cpp's server.

Every test here is marked ``real`` (and ``broker``: it runs Hutch on the real RabbitMQ).
The servers come from two extras, ``real-litellm`` and ``real-llamacpp`` (``real`` is
both), too large for the default test install; ``scripts/install-real-extras`` installs
them (and caches the llama.cpp build). Without an extra, its tests are never skipped silently:

* the run says so right after collection, and again at the end, with the command to run
  them, and each such test is reported skipped with the same reason;
* when these tests were asked for (``pytest -m real``, or ``HUTCH_REAL_TESTS=require`` as
  ``.ci/run`` sets), a missing extra fails every test that needs it instead.

The servers start once per session (LiteLLM's proxy takes 15 s or more to import) on
free ports, each with its log under the session's temporary directory.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.real.harness import RealBackend
from tests.real.servers import (
    LLAMA_CONTEXT,
    ServerProcess,
    litellm_key,
    litellm_server,
    llama_server,
)
from tests.real.tiny_model import write_tiny_llama

#: Each server (its extra is ``real-<server>``), the modules that show the extra is
#: installed, and the fixtures that need it.
EXTRAS = {
    "litellm": (("litellm", "litellm_proxy_extras"), ("litellm_proxy",)),
    "llamacpp": (("llama_cpp", "gguf", "starlette_context"), ("llama_cpp_server", "tiny_model")),
}
HOW_TO_RUN = ("scripts/install-real-extras && .venv/bin/pytest -m real  "
              "(docs/development.md: \"Tests against real servers\")")
_HERE = Path(__file__).parent
_NOT_RUN = pytest.StashKey[dict[str, int]]()
#: Environment variable holding LiteLLM's master key for Hutch (``api_key_env``).
LITELLM_KEY_ENV = "REAL_LITELLM_MASTER_KEY"


def missing_extras() -> list[str]:
    """The extras whose modules are not importable here (found without importing)."""
    return [extra for extra, (modules, _) in EXTRAS.items()
            if any(importlib.util.find_spec(module) is None for module in modules)]


def _required(config: pytest.Config) -> bool:
    """Were the real-server tests asked for, so a missing extra is a failure?"""
    markexpr = (config.getoption("markexpr", "") or "").strip()
    return os.environ.get("HUTCH_REAL_TESTS") == "require" or markexpr == "real"


def _needs(item: pytest.Item) -> set[str]:
    """The extras a test needs: by the server fixtures it uses, or its ``real_server``
    parameter (named after the extra)."""
    names = set(getattr(item, "fixturenames", ()))
    needs = {extra for extra, (_, fixtures) in EXTRAS.items() if names & set(fixtures)}
    callspec = getattr(item, "callspec", None)
    if callspec is not None:
        needs |= {value for value in callspec.params.values() if value in EXTRAS}
    return needs


def _message(extras: list[str]) -> str:
    names = ", ".join(f"'real-{extra}'" for extra in extras)
    return f"real-server tests NOT RUN: extra {names} not installed. Run them: {HOW_TO_RUN}"


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark this directory's tests ``real``; skip (or, when required, keep to fail in
    their fixtures) those whose extra is missing. Runs before ``-m`` deselects."""
    missing = set(missing_extras())
    required = _required(config)
    for item in items:
        if _HERE not in item.path.parents:
            continue
        item.add_marker(pytest.mark.real)
        absent = sorted(_needs(item) & missing)
        if absent:
            item.stash[_NOT_RUN] = {extra: 1 for extra in absent}
            if not required:
                item.add_marker(pytest.mark.skip(reason=_message(absent)))


def _not_run(items: list[pytest.Item]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for item in items:
        for extra in item.stash.get(_NOT_RUN, {}):
            counts[extra] = counts.get(extra, 0) + 1
    return counts


def pytest_report_collectionfinish(config: pytest.Config, items: list[pytest.Item]
                                   ) -> list[str]:
    """Right after "collected N items": which real-server tests will not run, and why."""
    counts = _not_run(items)
    config.stash[_NOT_RUN] = counts
    if not counts:
        return []
    verdict = "will FAIL (required)" if _required(config) else "are skipped"
    return [f"{count} real-server test(s) needing extra 'real-{extra}' {verdict}: it is not "
            f"installed" for extra, count in sorted(counts.items())] + [
        f"Run them: {HOW_TO_RUN}"]


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter,
                            config: pytest.Config) -> None:
    """Say it again at the end, where a reader of the run looks."""
    counts = config.stash.get(_NOT_RUN, {})
    if counts:
        terminalreporter.section("real-server tests NOT RUN", sep="=", yellow=True,
                                 bold=True)
        terminalreporter.line(_message(sorted(counts)))


def require_extra(extra: str) -> None:
    """Fail (when required) or skip a fixture whose extra is missing: a skip here is the
    reported one of ``pytest_collection_modifyitems``, never a silent one."""
    if extra in missing_extras():
        pytest.fail(_message([extra]), pytrace=False)


@pytest.fixture(scope="session")
def real_workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Configs, logs and the model file of this session's servers."""
    return tmp_path_factory.mktemp("real-servers")


@pytest.fixture(scope="session")
def tiny_model(real_workdir: Path) -> Path:
    require_extra("llamacpp")
    return write_tiny_llama(real_workdir / "tiny-llama.gguf")


def _serve(server: ServerProcess) -> Iterator[ServerProcess]:
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def litellm_proxy(real_workdir: Path) -> Iterator[ServerProcess]:
    """LiteLLM's proxy, for the whole session; its master key (also that of every other
    LiteLLM server of the session) in ``LITELLM_KEY_ENV``."""
    require_extra("litellm")
    os.environ[LITELLM_KEY_ENV] = litellm_key()
    yield from _serve(litellm_server(real_workdir, os.environ[LITELLM_KEY_ENV]))


@pytest.fixture(scope="session")
def llama_cpp_server(real_workdir: Path, tiny_model: Path) -> Iterator[ServerProcess]:
    """llama.cpp's server on the tiny model, for the whole session."""
    require_extra("llamacpp")
    yield from _serve(llama_server(real_workdir, tiny_model))


#: Hutch's pool for LiteLLM: its deployments (servers.py) and one it does not have.
LITELLM_MODELS = ("real-fast", "real-slow", "real-limited", "real-error", "real-context",
                  "real-missing")


def litellm_backend(server: ServerProcess) -> RealBackend:
    return RealBackend("litellm", server, model="real-fast", models=LITELLM_MODELS,
                       usage_in_stream=True, max_concurrency=8, api_key_env=LITELLM_KEY_ENV,
                       throttle_scope="model", too_long={"model": "real-context"},
                       too_long_code="400",
                       server_error={"model": "real-error"})


def llamacpp_backend(server: ServerProcess) -> RealBackend:
    too_long = {"messages": [{"role": "user", "content": "hello world " * LLAMA_CONTEXT}]}
    return RealBackend("llamacpp", server, model="tiny-llama", models=("tiny-llama",),
                       usage_in_stream=False, max_concurrency=1,
                       deterministic={"temperature": 0, "seed": 7, "max_tokens": 12},
                       too_long=too_long, server_error={"min_p": "bad"})


@pytest.fixture(params=sorted(EXTRAS))
def real_backend(request: pytest.FixtureRequest) -> RealBackend:
    """Each real server in turn (the parameter is the extra it needs)."""
    if request.param == "litellm":
        return litellm_backend(request.getfixturevalue("litellm_proxy"))
    return llamacpp_backend(request.getfixturevalue("llama_cpp_server"))
