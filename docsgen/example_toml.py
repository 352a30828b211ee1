"""``hutch.example.toml``: every key of the settings model, with its default and doc text.

Keys that have a default are written commented out (``# key = default``): uncomment one to
change it. The sample pool, backend and gateway key are real tables, so the file loads as
it is (``tests/test_docs.py`` checks it does, and that it is what this module writes).
"""

from __future__ import annotations

import re
import textwrap
from typing import Any

from pydantic import BaseModel

from docsgen.fields import FieldDoc, field_docs, toml_value
from pipeline.gateway.settings import GatewayKey, GatewaySettings
from pipeline.scheduling.settings import BandSettings, PoolScheduling, TenantSettings
from pipeline.settings import BackendSettings, PoolSettings, Settings

__all__ = ["EXAMPLES", "example_toml"]

#: Values shown for keys without a default, or whose default is none, by ``Model.key``.
EXAMPLES: dict[str, Any] = {
    "Settings.management_url": "http://127.0.0.1:15672",
    "Settings.tls_ca_file": "/etc/hutch/ca.pem",
    "Settings.tls_cert_file": "/etc/hutch/client.pem",
    "Settings.tls_key_file": "/etc/hutch/client.key",
    "PoolSettings.name": "chat",
    "PoolSettings.models": ["mock-small", "mock-large"],
    "PoolSettings.message_ttl_ms": 600000,
    "BackendSettings.name": "mock-1",
    "BackendSettings.url": "http://127.0.0.1:8001/v1",
    "BackendSettings.max_concurrency": 4,
    "BackendSettings.api_key_env": "VLLM_API_KEY",
    "BackendSettings.metrics_url": "http://127.0.0.1:8000/metrics",
    "BandSettings.name": "interactive",
    "BandSettings.min_priority": 5,
    "TenantSettings.max_priority": 5,
    "TenantSettings.tokens_per_minute": 100000,
    "TenantSettings.users": ["billing", "billing-batch"],
    "GatewayKey.identity": "chat-ui",
    "GatewayKey.key_env": "CHAT_UI_API_KEY",
    "GatewayKey.key_hash": "sha256:<salt>:<hash>",
    "GatewayKey.max_priority": 9,
    "GatewayKey.timeout_s": 30.0,
}

_HEADER = """\
# Hutch configuration: every key, with its default. Generated from the settings model
# (pipeline/settings.py, pipeline/gateway/settings.py) by `python -m docsgen`: do not edit
# by hand. docs/reference/configuration.md explains each key.
#
# Lines `# key = value` show a default (or, for optional keys, an example): uncomment one to
# change it. Environment variables override this file (HUTCH_AMQP_URL, HUTCH_PREFIX, ...;
# HUTCH_POOLS as a JSON list). Pass the file with `--config hutch.toml`."""


def _plain(text: str) -> str:
    """Doc text without Markdown links."""
    return re.sub(r"\[([^\]]+)\]\([^)]+\)", r"\1", text)


def _key(model: type[BaseModel], doc: FieldDoc, *, explain: bool = True) -> list[str]:
    """The key's line (commented out unless required), after its doc text if ``explain``."""
    name = f"{model.__name__}.{doc.key}"
    if name in EXAMPLES:
        value = toml_value(EXAMPLES[name])
    else:
        value = toml_value(model.model_fields[doc.key].get_default(call_default_factory=True))
    comment = textwrap.wrap(_plain(doc.text), 86, initial_indent="# ",
                            subsequent_indent="# ") if explain else []
    line = f"{doc.key} = {value}"
    return [*comment, line if doc.required else f"# {line}"]


def _table(model: type[BaseModel], header: str | None, *, commented: bool = False,
           skip: tuple[str, ...] = ()) -> list[str]:
    lines = [""] if header is None else ["", header]
    previous = ""
    for doc in field_docs(model):
        if doc.key in skip:
            continue
        explain = doc.text != previous  # keys that share a comment follow it directly
        entry = _key(model, doc, explain=explain)
        if commented:
            entry = [line if line.startswith("#") else f"# {line}" for line in entry]
        lines += ["", *entry] if explain else entry
        previous = doc.text
    return lines


def example_toml() -> str:
    """The whole file."""
    lines = [_HEADER]
    lines += _table(Settings, None, skip=("pools", "tenants", "gateway"))
    lines += _table(PoolSettings, "[[pools]]", skip=("backends", "scheduling"))
    lines += _table(BackendSettings, "[[pools.backends]]")
    lines += _table(PoolScheduling, "[pools.scheduling]", skip=("bands",))
    lines += ["", "# Priority bands (strict: every request of a higher band first) replace the",
              "# default single band: list them lowest first, the first from min_priority 0",
              "# (say `batch` at 0, then this one).", "# [[pools.scheduling.bands]]"]
    lines += _table(BandSettings, None, commented=True)
    lines += ["", "# A tenant (a broker user, a gateway identity, or a team of them):",
              "# [tenants.billing]"]
    lines += _table(TenantSettings, None, commented=True)
    lines += _table(GatewaySettings, "[gateway]", skip=("keys",))
    lines += ["", "# API keys: without any, the gateway runs in an open development mode.",
              "# [[gateway.keys]]"]
    lines += _table(GatewayKey, None, commented=True)
    return "\n".join(lines).replace("\n\n\n", "\n\n") + "\n"
