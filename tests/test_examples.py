"""The files of examples/ run against the real broker, and the docs show them verbatim.

Each example runs as its user would run it: a separate Python process whose only
configuration is ``HUTCH_AMQP_URL`` and ``HUTCH_PREFIX``, against a topology and a worker
(with the mock backend) of this test's own. A page of docs/ (or the README) embeds each
file in the fenced block after an ``<!-- example: examples/NAME.py -->`` marker, and that
block must equal the file, so the documentation's code cannot rot.
"""

from __future__ import annotations

import re
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from pipeline.broker.topology import apply_topology, delete_topology
from pipeline.settings import Settings
from pipeline.testing.mock import MockBackend
from tests.conftest import SettingsFactory, run_process, running_worker

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
#: The client id every example uses: its reply queue is removed after the test.
CLIENT_ID = "my-app-1"
RUN_TIMEOUT_S = 60

_MARKED_BLOCK = re.compile(
    r"<!-- example: (?P<path>examples/[\w.-]+\.py) -->\n+```python\n(?P<code>.*?)```",
    re.DOTALL)

#: What each example prints when it works (a regex per line, in order).
EXPECTED = {
    "raw_aio_pika.py": [r"mock reply to: hello"],
    "client_chat.py": [r"mock reply to: hello"],
    "client_minimal.py": [r"mock reply to: hello"],
    "client_request.py": [r"mock reply to: hi",
                          r"backend t\w+-b1, queued \d+ ms, \d+ ms in all"],
    "client_concurrent.py": [r"25 answers; the last one: mock reply to: question 24"],
    "raw_streaming.py": [r"mock reply to: hello", r"\d+ chunk messages, \d+ tokens in all"],
    "client_stream.py": [r"mock reply to: hello", r"finish_reason stop, \d+ tokens",
                         r"cancelled request [0-9a-f]{32} after its first chunk"],
}


def _docs_blocks() -> dict[str, str]:
    """``page: example path`` -> the code block after its marker, over the README and docs/."""
    return {f"{page.relative_to(ROOT)}: {match['path']}": match["code"] for page in PAGES
            for match in _MARKED_BLOCK.finditer(page.read_text())}


def test_every_example_is_tested_and_shown_in_the_docs() -> None:
    files = {path.name for path in EXAMPLES.glob("*.py")}
    assert files == set(EXPECTED), "list each example's expected output in EXPECTED"
    shown = {key.split(": ", 1)[1] for key in _docs_blocks()}
    assert shown == {f"examples/{name}" for name in files}


@pytest.mark.parametrize("shown", sorted(_docs_blocks()))
def test_docs_block_is_the_file(shown: str) -> None:
    path = shown.split(": ", 1)[1]
    assert _docs_blocks()[shown] == (ROOT / path).read_text(), (
        f"the docs' block after '<!-- example: {path} -->' differs from {path}; "
        "copy the file into the page")


@pytest.fixture
async def served(make_settings: SettingsFactory, mock: MockBackend
                 ) -> AsyncIterator[Settings]:
    """A topology under this test's prefix and a worker on the mock; removed afterwards."""
    settings = make_settings([("b1", mock.base_url, 4)])
    await apply_topology(settings)
    try:
        async with running_worker(settings):
            yield settings
    finally:
        await delete_topology(settings, reply_queues=[CLIENT_ID])


async def _run(script: Path, env: dict[str, str]) -> tuple[int, str, str]:
    """Run one example in its own interpreter; always reaped, killed if it overruns."""
    return await run_process([sys.executable, str(script)], env, RUN_TIMEOUT_S, cwd=ROOT)


@pytest.mark.parametrize("name", sorted(EXPECTED))
async def test_example_runs(name: str, served: Settings, hutch_env: dict[str, str]) -> None:
    env = dict(hutch_env, HUTCH_AMQP_URL=served.amqp_url, HUTCH_PREFIX=served.prefix)
    code, out, err = await _run(EXAMPLES / name, env)
    assert code == 0, f"{name} exited {code}\nstdout:\n{out}\nstderr:\n{err}"
    lines = out.splitlines()
    assert len(lines) == len(EXPECTED[name]), out
    for line, pattern in zip(lines, EXPECTED[name], strict=True):
        assert re.fullmatch(pattern, line), f"{name}: {line!r} !~ {pattern!r}"
