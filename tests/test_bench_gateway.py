"""``hutch bench scenario gateway`` (issue 19, finding 14): on the broker it was given
(its management API checked before anything starts, and carried into every stack), with
LiteLLM's proxy given a master key, a proxy that sustains none of the offered rates said
so, and ports pinned by options. LiteLLM itself is stood in for by a small fake with its
command line (tests/real runs the real proxy)."""

from __future__ import annotations

import io
import shutil
import sys
from pathlib import Path

import pytest

from hutch_bench.cli import parse, run_scenario, scenario_options
from hutch_bench.cluster_nodes import free_ports
from hutch_bench.scenarios.litellm import API_KEY, versus_litellm
from hutch_bench.stack import Stack, check_broker, on_broker
from pipeline.errors import TopologyError
from pipeline.settings import load_settings
from tests.nodes import LocalNode

#: LiteLLM's proxy as the scenario runs it (``--config --host --port --num_workers``):
#: it refuses to start without a master key, logs whether each call carried that key, and
#: answers every call 500, so it sustains none of the rates.
FAKE_LITELLM = '''#!{python}
import argparse, json, os, sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

parser = argparse.ArgumentParser()
for option in ("--config", "--host", "--port", "--num_workers"):
    parser.add_argument(option)
args = parser.parse_args()
key = json.load(open(args.config)).get("general_settings", {{}}).get("master_key")
if not key:
    sys.exit("no master_key in the config")


class Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        self.answer(200, {{"status": "healthy"}})

    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        good = self.headers.get("Authorization") == "Bearer " + key
        with open(os.environ["FAKE_LITELLM_LOG"], "a") as log:
            log.write("key ok\\n" if good else "key wrong\\n")
        self.answer(500 if good else 401, {{"error": {{"message": "fake", "code": "500"}}}})

    def answer(self, status, body):
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


ThreadingHTTPServer((args.host, int(args.port)), Handler).serve_forever()
'''


@pytest.mark.timeout(150)
async def test_litellm_that_sustains_nothing_is_reported_so(
        amqp_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake, calls = tmp_path / "litellm", tmp_path / "calls.log"
    fake.write_text(FAKE_LITELLM.format(python=sys.executable))
    fake.chmod(0o755)
    monkeypatch.setenv("FAKE_LITELLM_LOG", str(calls))
    monkeypatch.setenv("HUTCH_AMQP_URL", amqp_url)
    gateway_port, litellm_port = free_ports(2)
    out = io.StringIO()
    report = await run_scenario(parse([
        "scenario", "gateway", "--quick", "--litellm-bin", str(fake),
        "--gateway-port", str(gateway_port), "--litellm-port", str(litellm_port)]), out=out)
    text = out.getvalue()
    assert f"gateway http://127.0.0.1:{gateway_port}/v1" in text
    assert f"litellm http://127.0.0.1:{litellm_port}/v1" in text
    assert report["max_sustained_rps"]["litellm"] == 0
    assert report["gateway_to_litellm"] is None
    target = {t["name"]: t for t in report["targets"]}["gateway throughput >= 3x LiteLLM's proxy"]
    assert target["measured"].startswith(
        "LiteLLM's proxy sustained none of the offered rates: at 40 req/s 0 answered/s, "
        "40 errors"), target
    assert target["met"] is False
    assert "not run" not in text
    lines = calls.read_text().splitlines()
    assert lines and set(lines) == {"key ok"}  # the clients send the master key it got


async def test_another_brokers_management_api_is_refused_before_anything_starts(
        local_node: LocalNode, monkeypatch: pytest.MonkeyPatch) -> None:
    """Only HUTCH_AMQP_URL set, to a broker whose API is not on :15672 (a local node):
    the default API is the main broker's, so the scenario refuses at once, saying to set
    HUTCH_MANAGEMENT_URL; with it set, the check passes."""
    monkeypatch.setenv("HUTCH_AMQP_URL", local_node.amqp_url())
    monkeypatch.delenv("HUTCH_MANAGEMENT_URL", raising=False)
    out = io.StringIO()
    with pytest.raises(TopologyError, match="belongs to another broker") as refused:
        await run_scenario(parse(["scenario", "gateway", "--quick"]), out=out)
    assert "HUTCH_MANAGEMENT_URL" in str(refused.value)
    assert out.getvalue() == ""  # nothing started, nothing measured
    monkeypatch.setenv("HUTCH_MANAGEMENT_URL", local_node.management_url)
    await check_broker(load_settings())


def test_stacks_on_the_users_broker_carry_its_management_api_and_tls(tmp_path: Path
                                                                     ) -> None:
    """From a configuration file as much as from the environment: every stack on that
    broker (and so every worker and gateway it starts) uses the same API and TLS files."""
    ca = tmp_path / "ca.pem"
    ca.write_text("unused")
    user = load_settings(amqp_url="amqp://u:p@broker-a:5672/", tls_ca_file=str(ca),
                         management_url="http://broker-a-admin:15672")
    pool = [{"name": "p", "models": ["m"],
             "backends": [{"name": "b", "url": "http://127.0.0.1:9/v1", "max_concurrency": 1}]}]
    stacks = [Stack("amqp://u:p@broker-a:5672/"), Stack("amqp://guest:guest@other:5672/")]
    try:
        with on_broker(user):
            mine, other = (stack.settings(pool) for stack in stacks)
        outside = stacks[0].settings(pool)
    finally:
        for stack in stacks:
            shutil.rmtree(stack.dir)
    assert (mine.management_url, mine.tls_ca_file) == ("http://broker-a-admin:15672", str(ca))
    assert mine.prefix == stacks[0].prefix
    assert (other.management_url, other.tls_ca_file) == (None, None)
    assert outside.management_url is None


def test_throughput_target_says_why_there_is_no_ratio() -> None:
    row = {"offered_rps": 50, "achieved_rps": 12.0, "errors": 38,
           "latency_ms": {"p99": 900.0}}
    assert versus_litellm({"direct": 900, "gateway": 600}, {}) == (
        "LiteLLM's proxy not run", False)
    assert versus_litellm({"gateway": 600, "litellm": 0.0}, {"litellm": [row]}) == (
        "LiteLLM's proxy sustained none of the offered rates: at 50 req/s 12 answered/s, "
        "38 errors, p99 900 ms", False)
    assert versus_litellm({"gateway": 600, "litellm": 150}, {}) == (
        "600 vs 150 req/s = 4.00x", True)


def test_ports_are_options_and_the_master_key_is_the_clients_key() -> None:
    options = scenario_options(parse(["scenario", "gateway", "--gateway-port", "18080",
                                      "--litellm-port", "18081"]))
    assert (options.gateway_port, options.litellm_port) == (18080, 18081)
    assert scenario_options(parse(["scenario", "gateway"])).gateway_port == 0
    assert API_KEY.startswith("sk-")  # LiteLLM wants its master key to start with sk-
