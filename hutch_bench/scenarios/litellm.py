"""LiteLLM's proxy in the ``gateway`` scenario: found, started on the mock, compared.

It is not a dependency: it pins many packages, so it lives in a virtualenv of its own
(``--litellm-bin``, ``$HUTCH_LITELLM_BIN`` or ``litellm`` on PATH). It gets a master key
(LiteLLM 1.108 wants one), the key every system's client sends.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
from typing import Any

from hutch_bench.scenarios.common import MODEL
from hutch_bench.stack import Child, MockProcess, Stack, free_port, until_http
from pipeline.errors import StackError

__all__ = ["API_KEY", "LITELLM_ENV", "LITELLM_HINT", "find_litellm", "start_litellm",
           "versus_litellm"]

#: Where the scenario looks for LiteLLM's proxy when ``--litellm-bin`` is not given.
LITELLM_ENV = "HUTCH_LITELLM_BIN"
LITELLM_HINT = (
    "LiteLLM's proxy was not found (--litellm-bin, $HUTCH_LITELLM_BIN, or `litellm` on "
    "PATH), so it is left out of this run. Install it in a virtualenv of its own (it pins "
    "many packages): python -m venv /opt/litellm && /opt/litellm/bin/pip install "
    "'litellm[proxy]==1.77.7' (the `litellm` extra of hutch), then pass --litellm-bin "
    "/opt/litellm/bin/litellm.")
#: The key every system's client sends, and LiteLLM's master key.
API_KEY = "sk-hutch-bench"
_START_TIMEOUT_S = 180.0  # LiteLLM's proxy imports for ~15 s on an idle machine


def find_litellm(given: str = "") -> str | None:
    """The ``litellm`` executable: ``given``, else ``$HUTCH_LITELLM_BIN``, else PATH."""
    for candidate in (given, os.environ.get(LITELLM_ENV, "")):
        if candidate:
            found = shutil.which(candidate)
            if found is None:
                raise StackError(f"LiteLLM's proxy {candidate!r} is not an executable")
            return found
    return shutil.which("litellm")


async def start_litellm(stack: Stack, executable: str, mock: MockProcess, port: int = 0
                        ) -> str:
    """LiteLLM's proxy (one worker process) with one deployment, ``mock``, on ``port``
    (0: a free one); its base URL. It is kept from the network: its price list is its
    local copy, telemetry is off."""
    config = stack.dir / "litellm.json"  # JSON is YAML: no yaml package needed here
    config.touch(mode=0o600)
    config.write_text(json.dumps({
        "model_list": [{"model_name": MODEL, "litellm_params": {
            "model": f"openai/{MODEL}", "api_base": mock.url, "api_key": "sk-unused"}}],
        "general_settings": {"master_key": API_KEY}}))
    port, log_path = port or free_port(), stack.dir / "litellm.log"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "LITELLM_LOCAL_MODEL_COST_MAP": "True",
           "LITELLM_TELEMETRY": "False", "NO_COLOR": "1"}
    with log_path.open("wb") as log:
        process = await asyncio.create_subprocess_exec(
            executable, "--config", str(config), "--host", "127.0.0.1", "--port",
            str(port), "--num_workers", "1", stdin=asyncio.subprocess.DEVNULL, stdout=log,
            stderr=asyncio.subprocess.STDOUT, env=env)
    child = Child("litellm", process, log_path)
    stack.children.append(child)
    await until_http(child, f"http://127.0.0.1:{port}/health/liveliness", _START_TIMEOUT_S)
    return f"http://127.0.0.1:{port}/v1"


def versus_litellm(best: dict[str, float], sweep: dict[str, list[dict[str, Any]]]
                   ) -> tuple[str, bool]:
    """The throughput target's figure and whether it is met: the gateway's ratio to
    LiteLLM's proxy, or why there is none (not run; or run, and it sustained none of the
    offered rates: its first step then says how it did)."""
    if "litellm" not in best:
        return "LiteLLM's proxy not run", False
    if not best["litellm"]:
        first = (sweep.get("litellm") or [{}])[0]
        detail = "" if not first else (
            f": at {first['offered_rps']:g} req/s {first['achieved_rps']:.0f} answered/s, "
            f"{first['errors']} errors, p99 {first['latency_ms']['p99'] or 0:.0f} ms")
        return f"LiteLLM's proxy sustained none of the offered rates{detail}", False
    ratio = best["gateway"] / best["litellm"]
    return f"{best['gateway']:.0f} vs {best['litellm']:.0f} req/s = {ratio:.2f}x", ratio >= 3
