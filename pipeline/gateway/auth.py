"""API keys to client identities: who a request is from, and what it may ask for.

A key is matched in constant time against every configured key (environment keys by
value, stored ones by their salted SHA-256): API keys are long random tokens, so a fast
salted hash is enough to keep them out of configuration files, and it costs microseconds
per request. Keys are never logged; an identity is.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from dataclasses import dataclass

from pipeline.errors import ConfigError
from pipeline.gateway.settings import GatewaySettings

__all__ = ["Client", "KeyRing", "hash_key"]


@dataclass(frozen=True, slots=True)
class Client:
    """A caller the gateway knows: its identity, default and highest priority, default
    deadline (None: the gateway's)."""

    identity: str
    default_priority: int
    max_priority: int
    timeout_s: float | None = None

    def priority(self, asked: int | None) -> int:
        """The priority a request gets: what it asked for, clamped to this client's range."""
        if asked is None:
            return self.default_priority
        return max(0, min(asked, self.max_priority))


def hash_key(key: str, salt: str | None = None) -> str:
    """The ``key_hash`` of ``key``: ``sha256:<salt>:<sha256(salt + key)>`` (hex)."""
    salt = salt if salt is not None else secrets.token_hex(16)
    digest = hashlib.sha256(bytes.fromhex(salt) + key.encode()).hexdigest()
    return f"sha256:{salt}:{digest}"


@dataclass(frozen=True, slots=True)
class _Entry:
    salt: bytes | None  # None: ``secret`` is the key itself (from the environment)
    secret: bytes
    client: Client


class KeyRing:
    """Every configured key; :meth:`client` says whose a presented key is."""

    def __init__(self, settings: GatewaySettings) -> None:
        self._entries: list[_Entry] = []
        for i, key in enumerate(settings.keys):
            client = Client(key.identity, key.default_priority, key.ceiling, key.timeout_s)
            if key.key_env is not None:
                value = os.environ.get(key.key_env)
                if not value:
                    raise ConfigError(f"gateway.keys.{i}.key_env: environment variable "
                                      f"{key.key_env} is not set")
                self._entries.append(_Entry(None, value.encode(), client))
            else:
                assert key.key_hash is not None
                _, salt, digest = key.key_hash.split(":")
                self._entries.append(_Entry(bytes.fromhex(salt), bytes.fromhex(digest),
                                            client))
        #: No keys: open development mode, everyone is this client.
        self.open_client = None if self._entries else Client(
            settings.open_identity, 0, settings.open_max_priority)

    @property
    def open(self) -> bool:
        return self.open_client is not None

    def identities(self) -> list[str]:
        """Every identity a request may be counted under (bounded metric labels)."""
        if self.open_client is not None:
            return [self.open_client.identity]
        return sorted({entry.client.identity for entry in self._entries})

    def client(self, authorization: str | None) -> Client | None:
        """The client of an ``Authorization: Bearer <key>`` header, None if unknown.
        Every entry is compared, so the time taken says nothing about which matched."""
        if self.open_client is not None:
            return self.open_client
        if not authorization or not authorization[:7].lower() == "bearer ":
            return None
        presented = authorization[7:].strip().encode()
        found = None
        for entry in self._entries:
            candidate = presented if entry.salt is None else hashlib.sha256(
                entry.salt + presented).digest()
            if hmac.compare_digest(candidate, entry.secret) and found is None:
                found = entry.client
        return found
