"""What the settings model says about each key: type, default, constraints, doc comment.

Doc comments are the ``#:`` lines above a field in the model's source; a comment also
covers the uncommented fields right below it that it names (``stream_max_chunks`` under
the comment of ``stream_window_ms``). A key the
source leaves uncommented takes its text from :data:`NOTES`; ``tests/test_docs.py`` fails
when a key has both or neither, so a comment added to the code replaces its note here.
"""

from __future__ import annotations

import ast
import inspect
import json
import re
import textwrap
import types
from dataclasses import dataclass
from typing import Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel
from pydantic.fields import FieldInfo

__all__ = ["NOTES", "FieldDoc", "comments", "field_docs", "toml_value", "type_name"]

#: Text for the keys whose source has no ``#:`` comment, by ``Model.key``.
NOTES = {
    "Settings.amqp_url": "Broker URL (`amqp://` or `amqps://`); its path is the vhost. A list "
    "is a cluster's nodes, tried in order (see [Cluster](../cluster.md)).",
    "Settings.max_priority": "`x-max-priority` of the classic work queues (the highest "
    "priority; larger ones count as it). Cannot change once a queue is declared.",
    "Settings.tls_cert_file": "Mutual TLS: the client certificate (PEM) presented on every "
    "AMQP and management API connection; give `tls_key_file` too.",
    "Settings.tls_key_file": "Mutual TLS: the client certificate's key (PEM).",
    "PoolSettings.breaker_cooldown_s": "How long an open circuit keeps the backend out "
    "before one probe (doubles while probes fail, up to 300 s).",
    "GatewaySettings.open_max_priority": "Open development mode: the highest priority a "
    "request may ask for.",
    "GatewaySettings.max_timeout_s": "The longest deadline a request may ask for "
    "(`x-hutch-timeout`).",
    "BandSettings.min_priority": "The lowest AMQP priority of the band (the first band "
    "starts at 0; each next band higher).",
    "Settings.pools": "The pools (`[[pools]]`); a worker needs at least one.",
    "PoolSettings.name": "Pool name: its work queue is `<prefix>.work.<name>`.",
    "PoolSettings.models": "Model names routed to this pool (the routing keys); each model "
    "belongs to exactly one pool.",
    "PoolSettings.max_queue_length": "Queue bound (the policy's `max-length`): beyond it "
    "publishes are refused (`queue_full`).",
    "PoolSettings.backends": "The pool's backends (`[[pools.backends]]`).",
    "BackendSettings.name": "Backend name, unique across all pools: names its lease "
    "`<prefix>.lease.<name>` and its metrics.",
    "BackendSettings.url": "OpenAI-compatible base URL, with its `/v1`: Hutch POSTs to "
    "`<url>/chat/completions` (and `/completions`, `/embeddings`).",
    "BackendSettings.max_concurrency": "Requests the backend serves at once: the prefetch, "
    "and the cap that holds across every worker replica.",
    "BackendSettings.timeout_s": "Timeout of one backend call (below RabbitMQ's 30 min "
    "`consumer_timeout`, attempts per delivery included).",
    "GatewaySettings.host": "Address the gateway listens on.",
    "GatewaySettings.port": "Port the gateway listens on (0: any free port).",
    "GatewaySettings.keys": "API keys (`[[gateway.keys]]`); none: open development mode.",
    "GatewayKey.identity": "The client identity of the key: a metric label, and the "
    "`x-hutch-user` the gateway publishes with.",
}


@dataclass(frozen=True)
class FieldDoc:
    """One key of one model, as the documentation shows it."""

    key: str
    type: str
    default: str
    constraints: str
    text: str
    required: bool


def comments(model: type[BaseModel]) -> dict[str, str]:
    """Field name -> its ``#:`` doc comment (inherited by uncommented fields right below)."""
    source, _ = inspect.getsourcelines(model)
    tree = ast.parse(textwrap.dedent("".join(source)))
    found: dict[str, str] = {}
    previous: tuple[int, str] | None = None  # (end line, comment) of the last field
    for node in tree.body[0].body:  # type: ignore[attr-defined]
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            previous = None
            continue
        lines: list[str] = []
        row = node.lineno - 2
        while row >= 0 and source[row].strip().startswith("#:"):
            lines.insert(0, source[row].strip()[2:].strip())
            row -= 1
        text = " ".join(lines)
        if (not text and previous and previous[0] == node.lineno - 1
                and node.target.id in previous[1]):
            text = previous[1]  # a comment naming the fields below it covers them
        if text:
            found[node.target.id] = _markdown(text)
        previous = (node.end_lineno or node.lineno, text) if text else None
    return found


def _markdown(text: str) -> str:
    """reST inline markup of the comments as Markdown."""
    text = re.sub(r":\w+:`~?([^`]+)`", r"`\1`", text)
    return text.replace("``", "`")


def type_name(annotation: Any) -> str:
    """A reader's name for a field's type."""
    origin = get_origin(annotation)
    if origin is Literal:
        return " or ".join(f'`"{arg}"`' for arg in get_args(annotation))
    if origin in (Union, types.UnionType):
        kept = [type_name(arg) for arg in get_args(annotation) if arg is not type(None)]
        return " or ".join(kept) + " (optional)"
    if origin is list:
        return f"list of {type_name(get_args(annotation)[0])}"
    if origin is dict:
        return f"table of {type_name(get_args(annotation)[1])} by name"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "table"
    return {str: "string", int: "integer", float: "number", bool: "boolean"}.get(
        annotation, str(annotation))


def toml_value(value: Any) -> str:
    """``value`` written as TOML."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, BaseModel):
        value = value.model_dump(exclude_none=True)
    if isinstance(value, dict):  # an inline table
        return "{" + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + "}"
    return json.dumps(str(value))


def _default(field: FieldInfo) -> tuple[str, bool]:
    if field.is_required():
        return "required", True
    value = field.get_default(call_default_factory=True)
    if value is None:
        return "none", False
    if isinstance(value, BaseModel):
        return "see below", False
    if value == {}:
        return "none", False
    return f"`{toml_value(value)}`", False


_BOUNDS = {"ge": "≥ {}", "gt": "> {}", "le": "≤ {}", "lt": "< {}",
           "min_length": "at least {} item(s)", "max_length": "at most {} item(s)"}


def _constraints(field: FieldInfo) -> str:
    parts = []
    for item in field.metadata:
        for attribute, template in _BOUNDS.items():
            bound = getattr(item, attribute, None)
            if bound is not None:
                parts.append(template.format(f"{bound:,}" if isinstance(bound, int)
                                             else bound))
        if getattr(item, "pattern", None):
            parts.append(f"matches `{item.pattern}`")
    return ", ".join(parts)


def field_docs(model: type[BaseModel]) -> list[FieldDoc]:
    """Every key of ``model``, in the source's order."""
    texts = comments(model)
    docs = []
    for name, field in model.model_fields.items():
        default, required = _default(field)
        text = texts.get(name) or NOTES.get(f"{model.__name__}.{name}", "")
        docs.append(FieldDoc(name, type_name(field.annotation), default,
                             _constraints(field), text, required))
    return docs
