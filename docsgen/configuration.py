"""The key tables of ``docs/reference/configuration.md``, from the settings model."""

from __future__ import annotations

from pydantic import BaseModel

from docsgen.fields import FieldDoc, field_docs
from docsgen.regions import plain_text
from pipeline.gateway.settings import GatewayKey, GatewaySettings
from pipeline.scheduling.settings import BandSettings, PoolScheduling, TenantSettings
from pipeline.settings import BackendSettings, PoolSettings, Settings

__all__ = ["SECTIONS", "configuration_tables", "environment_variable"]

#: (TOML section, model, what it is), in the order the page shows them.
SECTIONS: tuple[tuple[str, type[BaseModel], str], ...] = (
    ("top level", Settings, "The file's top-level keys."),
    ("[[pools]]", PoolSettings, "One table per pool: backends that serve the same models "
     "and share one work queue."),
    ("[[pools.backends]]", BackendSettings, "One table per backend of a pool: an "
     "OpenAI-compatible HTTP endpoint and the slots it serves at once."),
    ("[pools.scheduling]", PoolScheduling, "One table per pool, optional: how its requests "
     "are ordered at each of its backends (bands, tenants' fair share, lookahead, lanes)."),
    ("[[pools.scheduling.bands]]", BandSettings, "The pool's priority bands, lowest first "
     "(default: one band, `default`, from priority 0)."),
    ("[tenants.<name>]", TenantSettings, "One table per tenant the configuration says "
     "something about; every other user is a tenant of its own, served fairly all the same "
     "(see [Tenants and fair scheduling](../concepts/fair-scheduling.md))."),
    ("[gateway]", GatewaySettings, "`hutch gateway`, the OpenAI-compatible HTTP front door "
     "(see [OpenAI gateway](../gateway.md))."),
    ("[[gateway.keys]]", GatewayKey, "One table per API key of the gateway: who it is, and "
     "the priorities and deadline it gets."),
)


def environment_variable(section: str, key: str) -> str | None:
    """The variable that overrides ``key`` of ``section`` (none inside lists of tables)."""
    if section == "top level":
        return f"HUTCH_{key.upper()}"
    if section == "[gateway]" and key != "keys":
        return f"HUTCH_GATEWAY__{key.upper()}"
    return None


def _row(section: str, doc: FieldDoc) -> str:
    key = f"`{doc.key}`"
    variable = environment_variable(section, doc.key)
    if variable:
        key += f"<br>`{variable}`"
    kind = doc.type + (f"; {doc.constraints}" if doc.constraints else "")
    return f"| {key} | {kind} | {doc.default} | {plain_text(doc.text)} |"


def configuration_tables() -> str:
    """One Markdown table per section, every key of the model in source order."""
    parts = []
    for section, model, what in SECTIONS:
        title = "Top level" if section == "top level" else f"`{section}`"
        parts += [f"### {title}", "", f"{what.rstrip('.')} (`{model.__name__}`).", "",
                  "| Key | Type | Default | Meaning |", "|---|---|---|---|"]
        parts += [_row(section, doc) for doc in field_docs(model)]
        parts.append("")
    return "\n".join(parts)
