"""The ``[gateway]`` section of the one settings model (``Settings.gateway``).

API keys are never stored in the configuration: a key is either read from an environment
variable at start (``key_env``) or given as a salted hash (``key_hash``, made by ``hutch
gateway --hash-key``). Each key maps to a client identity with a default priority, the
highest priority it may ask for, and a default deadline. Keys that change while the
gateway runs live in ``keys_file`` (``[[keys]]`` tables of the same fields), re-read when
the file changes and on SIGHUP. With no keys and no ``keys_file`` the gateway runs in an
open development mode under ``open_identity`` (and says so loudly at start).

Imported by :mod:`pipeline.settings`: it must not import it back (nor anything heavy).
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

__all__ = ["GatewayKey", "GatewaySettings", "gateway_toml"]

# Identities become metric labels and x-hutch-user headers: keep them boring.
_IDENTITY = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$"
#: ``sha256:<salt, hex>:<sha256(salt + key), hex>``
_HASH = r"^sha256:[0-9a-f]{16,128}:[0-9a-f]{64}$"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class GatewayKey(_Strict):
    """One API key: who it is, and the priorities and deadline it gets."""

    identity: str = Field(pattern=_IDENTITY)
    #: Name of the environment variable holding the key (read once, at start).
    key_env: str | None = None
    #: The key's salted hash instead (``hutch gateway --hash-key`` prints one).
    key_hash: str | None = Field(default=None, pattern=_HASH)
    #: Priority of a request that asks for none.
    default_priority: int = Field(default=0, ge=0, le=255)
    #: The highest priority it may ask for (higher asks are clamped); default: its default.
    max_priority: int | None = Field(default=None, ge=0, le=255)
    #: Deadline of a request without ``x-hutch-timeout``; default: the gateway's.
    timeout_s: float | None = Field(default=None, gt=0)

    @model_validator(mode="after")
    def _one_source(self) -> GatewayKey:
        if (self.key_env is None) == (self.key_hash is None):
            raise ValueError(f"key {self.identity!r}: give exactly one of key_env, key_hash")
        if self.max_priority is not None and self.max_priority < self.default_priority:
            raise ValueError(f"key {self.identity!r}: max_priority is below default_priority")
        return self

    @property
    def ceiling(self) -> int:
        """The highest priority this key's requests get."""
        return self.default_priority if self.max_priority is None else self.max_priority


class GatewaySettings(_Strict):
    """``hutch gateway``: where it listens, its clients, its limits."""

    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=0, le=65535)
    keys: list[GatewayKey] = Field(default_factory=list)
    #: A TOML file of ``[[keys]]`` tables (the fields of ``[[gateway.keys]]``), read at
    #: start, re-read when it changes (checked every ``keys_reload_s``) and on SIGHUP: keys
    #: added, rotated or revoked without a restart. A file that fails to load keeps the
    #: keys in force. Set, the gateway is never open: an empty file admits nobody.
    keys_file: str | None = None
    keys_reload_s: float = Field(default=5.0, gt=0)
    #: Open development mode (no keys): the identity and priorities every request gets.
    open_identity: str = Field(default="anonymous", pattern=_IDENTITY)
    open_max_priority: int = Field(default=255, ge=0, le=255)
    #: Deadline of a request without ``x-hutch-timeout`` (seconds), and the longest one.
    default_timeout_s: float = Field(default=120.0, gt=0)
    max_timeout_s: float = Field(default=3600.0, gt=0)
    #: Slow clients: the whole body must arrive within ``body_timeout_s``; a connection
    #: that sends no complete request (slow-loris headers, idle keep-alive) is closed after
    #: ``idle_timeout_s``.
    body_timeout_s: float = Field(default=30.0, gt=0)
    idle_timeout_s: float = Field(default=15.0, gt=0)
    #: ``Retry-After`` of a 429 (the queue is full).
    retry_after_s: int = Field(default=1, ge=0)
    #: The replica's reply queue vanishes this long after the replica is gone.
    reply_queue_expires_s: int = Field(default=60, ge=10)

    @model_validator(mode="after")
    def _unique(self) -> GatewaySettings:
        seen = [key.identity for key in self.keys]
        for i, identity in enumerate(seen):
            if identity in seen[:i]:
                raise ValueError(f"keys.{i}.identity: {identity!r} is defined twice")
        if self.default_timeout_s > self.max_timeout_s:
            raise ValueError("default_timeout_s is above max_timeout_s")
        return self


def gateway_toml(data: dict[str, Any]) -> list[str]:
    """The ``[gateway]`` section's TOML lines (for :func:`pipeline.settings.dump_toml`)."""

    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        return repr(v) if isinstance(v, int | float) else json.dumps(str(v))

    lines = ["", "[gateway]"]
    lines += [f"{k} = {value(v)}" for k, v in data.items() if k != "keys"]
    for key in data.get("keys", []):
        lines += ["", "[[gateway.keys]]", *(f"{k} = {value(v)}" for k, v in key.items())]
    return lines
