"""Real OpenAI-compatible servers as subprocesses on free local ports.

Two servers no one here wrote: LiteLLM's proxy (with ``mock_response`` deployments, so no
provider is called) and llama.cpp's server (``python -m llama_cpp.server``) on the tiny
model of ``tiny_model.py``. Each runs from this interpreter, bound to 127.0.0.1, with its
output in a log file the tests read (LiteLLM's access log is how a test counts the calls
Hutch made). A server can be killed (``kill -9`` of its process group) and started again
on the same port, as a crashed server restarted by its supervisor would be.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

__all__ = [
    "LITELLM_REPLY",
    "LLAMA_CONTEXT",
    "ServerProcess",
    "free_port",
    "litellm_config",
    "litellm_key",
    "litellm_server",
    "llama_server",
]

#: What LiteLLM's mock deployments answer (its stream splits it into 3-character deltas).
LITELLM_REPLY = "Hutch carried this reply from LiteLLM."
#: llama.cpp's context window in the tests: small, so a long prompt exceeds it.
LLAMA_CONTEXT = 256
#: How long a server may take to answer its health check. LiteLLM's proxy imports for
#: about 15 s on an idle machine of 2 cores, over a minute while something compiles.
START_TIMEOUT_S = 180.0


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class ServerProcess:
    """One server subprocess: start, wait until healthy, kill, restart, read its log."""

    name: str
    argv: list[str]
    port: int
    log_path: Path
    health_path: str
    env: dict[str, str] = field(default_factory=dict)
    #: The API key Hutch must send (``Authorization: Bearer``), if any.
    api_key: str | None = None
    process: subprocess.Popen[bytes] | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self, timeout_s: float = START_TIMEOUT_S) -> None:
        """Start the server (log appended to) and return once its health check answers."""
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                self.argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env={**os.environ, "PYTHONUNBUFFERED": "1", **self.env},
                start_new_session=True)
        deadline = time.monotonic() + timeout_s
        url = f"http://127.0.0.1:{self.port}{self.health_path}"
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.process.returncode} while "
                                   f"starting:\n{self.log_tail()}")
            try:
                if httpx.get(url, timeout=2).status_code < 500:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        self.stop()
        raise RuntimeError(f"{self.name} did not answer {url} within {timeout_s:.0f}s:\n"
                           f"{self.log_tail()}")

    def _signal(self, signum: int) -> None:
        if self.process is not None and self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signum)  # its own session: workers included
            except ProcessLookupError:
                pass

    def kill(self) -> None:
        """``kill -9`` the server (and whatever it spawned); return once it is gone."""
        self._signal(signal.SIGKILL)
        if self.process is not None:
            self.process.wait(timeout=10)

    def stop(self) -> None:
        """Stop the server: SIGTERM, then SIGKILL after 10 s."""
        self._signal(signal.SIGTERM)
        if self.process is None:
            return
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.kill()

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def count_in_log(self, needle: str) -> int:
        return self.log_text().count(needle)

    def calls(self, status: int | None = None) -> int:
        """Chat calls in its access log (uvicorn's, both servers), of one status if
        given: the server's own count of what Hutch sent it."""
        suffix = f" {status} " if status is not None else ""
        return self.count_in_log(f'"POST /v1/chat/completions HTTP/1.1"{suffix}')


def _deployment(name: str, **params: Any) -> dict[str, Any]:
    return {"model_name": name, "litellm_params": {
        "model": f"openai/{name}", "api_key": "sk-never-sent", **params}}


def litellm_config(master_key: str) -> dict[str, Any]:
    """The proxy's config: one mock deployment per behaviour the contract checks need.

    ``real-limited`` allows 1 request a minute, enforced by the router's pre-call check
    (LiteLLM then answers 429 with ``llm_provider-retry-after: 60``); ``real-slow`` holds
    each call 1 s (``mock_delay``) so a kill finds calls in flight; ``real-error`` and
    ``real-context`` raise LiteLLM's own 500 and context-window errors.
    """
    return {
        "model_list": [
            _deployment("real-fast", mock_response=LITELLM_REPLY),
            _deployment("real-slow", mock_response=LITELLM_REPLY, mock_delay=1.0),
            _deployment("real-limited", mock_response=LITELLM_REPLY, rpm=1),
            _deployment("real-error", mock_response="litellm.InternalServerError"),
            _deployment("real-context", mock_response="litellm.ContextWindowExceededError"),
        ],
        # No retries inside the proxy: Hutch retries (and its tests count the calls).
        "router_settings": {"optional_pre_call_checks": ["enforce_model_rate_limits"],
                            "num_retries": 0},
        "general_settings": {"master_key": master_key},
    }


def litellm_key() -> str:
    """A fresh master key (the proxy refuses to start without a strong one)."""
    return f"sk-hutch-{secrets.token_hex(16)}"


def litellm_server(workdir: Path, master_key: str, *, name: str = "litellm") -> ServerProcess:
    """LiteLLM's proxy on a free port (not started), wanting ``master_key`` from its
    clients; ``LITELLM_LOCAL_MODEL_COST_MAP`` keeps it from fetching its price list."""
    config = workdir / f"{name}.yaml"
    config.write_text(json.dumps(litellm_config(master_key), indent=1))  # JSON is YAML
    port = free_port()
    argv = [sys.executable, "-m", "litellm.proxy.proxy_cli", "--config", str(config),
            "--host", "127.0.0.1", "--port", str(port), "--num_workers", "1"]
    env = {"LITELLM_LOCAL_MODEL_COST_MAP": "True",
           "LITELLM_TELEMETRY": "False", "NO_COLOR": "1"}
    return ServerProcess(name, argv, port, workdir / f"{name}.log", "/health/liveliness",
                         env=env, api_key=master_key)


def llama_server(workdir: Path, model: Path, *, name: str = "llamacpp") -> ServerProcess:
    """llama.cpp's server (llama-cpp-python) on ``model``, on a free port (not started).
    ``--model_alias`` is the model name it reports; one thread, one slot."""
    port = free_port()
    argv = [sys.executable, "-m", "llama_cpp.server", "--model", str(model),
            "--model_alias", "tiny-llama", "--host", "127.0.0.1", "--port", str(port),
            "--n_ctx", str(LLAMA_CONTEXT), "--n_threads", "1", "--n_batch", "64"]
    return ServerProcess(name, argv, port, workdir / f"{name}.log", "/v1/models")
