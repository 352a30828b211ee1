"""CI, from the installed wheel: every example of examples/ against an embedded Hutch.

Run by ``.ci/wheel-check`` with the clean virtualenv's Python, outside the checkout, so
``pipeline`` is the wheel's (checked). One embedded Hutch (a mock backend and a worker
serving ``mock-small`` under a prefix of their own, removed afterwards) answers every
example, each run as its user would: its own interpreter, configured by ``HUTCH_AMQP_URL``
and ``HUTCH_PREFIX`` only. Exit 1 when one fails (its output is printed).

    python .ci/wheel_examples.py EXAMPLES_DIR
"""

from __future__ import annotations

import asyncio
import os
import sys
import tempfile
from pathlib import Path

import pipeline
from pipeline.testing.embedded import embedded_hutch

#: The client id the examples use: its reply queue goes with the topology.
CLIENT_ID = "my-app-1"
RUN_TIMEOUT_S = 60


async def _run(script: Path, env: dict[str, str]) -> tuple[int, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, str(script), cwd=tempfile.gettempdir(), env=env,
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT)
    try:
        out, _ = await asyncio.wait_for(process.communicate(), RUN_TIMEOUT_S)
    except TimeoutError:
        process.kill()
        out, _ = await process.communicate()
        return -9, out.decode(errors="replace") + f"\n(killed after {RUN_TIMEOUT_S} s)"
    assert process.returncode is not None
    return process.returncode, out.decode(errors="replace")


async def run_all(scripts: list[Path]) -> int:
    """Run ``scripts`` one after the other against one embedded Hutch; 1 if one failed."""
    amqp_url = os.environ.get("HUTCH_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
    failed = []
    async with embedded_hutch(amqp_url, models=["mock-small"], capacity=8,
                              latency_ms=20) as hutch:
        hutch.client_ids.append(CLIENT_ID)
        env = {**os.environ, "HUTCH_AMQP_URL": amqp_url,
               "HUTCH_PREFIX": hutch.settings.prefix}
        for script in scripts:
            code, out = await _run(script, env)
            print(f"--- {script.name}: exit {code}\n{out.rstrip()}", flush=True)
            if code != 0:
                failed.append(script.name)
    print(f"examples from the wheel: {len(failed)} failed {failed}" if failed
          else "examples from the wheel: all ran")
    return 1 if failed else 0


def main(examples: Path) -> int:
    installed = Path(pipeline.__file__).resolve()
    if "site-packages" not in installed.parts:
        print(f"pipeline comes from {installed}, not from the installed wheel")
        return 1
    return asyncio.run(run_all(sorted(examples.resolve().glob("*.py"))))


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))
