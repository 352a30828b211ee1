"""API keys to client identities: who a request is from, and what it may ask for.

A presented key is hashed and compared in constant time (``hmac.compare_digest``) with
every configured key's salted SHA-256 (stored keys' own, environment keys' hashed at load
with a salt of the process): API keys are long random tokens, so a fast salted hash is
enough to keep them out of configuration files, and it costs microseconds per request.
Keys are never logged; an identity is. Keys in ``keys_file`` are swapped in by
:meth:`KeyRing.reload` while requests are served.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from dataclasses import dataclass

from pipeline.errors import ConfigError
from pipeline.gateway.keyfile import read_keys_file
from pipeline.gateway.settings import GatewayKey, GatewaySettings

__all__ = ["AUTH_FAILURES", "Client", "KeyRing", "hash_key"]


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
    salt: bytes
    digest: bytes  # sha256(salt + key)
    client: Client


#: Why a request was not let in (``hutch_gateway_auth_failures_total``'s ``reason``).
AUTH_FAILURES = ("missing", "malformed", "unknown_key")


def _entry(where: str, key: GatewayKey) -> _Entry:
    client = Client(key.identity, key.default_priority, key.ceiling, key.timeout_s)
    if key.key_env is not None:
        value = os.environ.get(key.key_env)
        if not value:
            raise ConfigError(f"{where}.key_env: environment variable {key.key_env} is "
                              "not set")
        # Hashed like a stored key, with a salt of this process: every comparison is of
        # two 32-byte digests, so not even a key's length shows in the time taken.
        salt = secrets.token_bytes(16)
        return _Entry(salt, hashlib.sha256(salt + value.encode()).digest(), client)
    assert key.key_hash is not None
    _, salt_hex, digest = key.key_hash.split(":")
    return _Entry(bytes.fromhex(salt_hex), bytes.fromhex(digest), client)


class KeyRing:
    """Every configured key; :meth:`client` says whose a presented key is, and
    :meth:`reload` re-reads ``keys_file`` (the keys in force stay if it fails)."""

    def __init__(self, settings: GatewaySettings) -> None:
        self._settings = settings
        self._entries: list[_Entry] = []
        #: No keys: open development mode, everyone is this client.
        self.open_client: Client | None = None
        self.reload()  # a key_env that is not set, a bad keys_file: ConfigError at start

    def reload(self) -> int:
        """Read the configured keys and ``keys_file`` again; how many are in force. Raises
        ConfigError (naming the entry, never a key) and keeps the old keys if any fails."""
        settings = self._settings
        entries = [_entry(f"gateway.keys.{i}", key) for i, key in enumerate(settings.keys)]
        if settings.keys_file is not None:
            entries += [_entry(f"gateway.keys_file: keys.{i}", key)
                        for i, key in enumerate(read_keys_file(settings.keys_file))]
        seen = [entry.client.identity for entry in entries]
        for i, identity in enumerate(seen):
            if identity in seen[:i]:
                raise ConfigError(f"gateway.keys_file: identity {identity!r} is also in "
                                  "[[gateway.keys]]")
        open_client = None if entries or settings.keys_file is not None else Client(
            settings.open_identity, 0, settings.open_max_priority)
        self._entries, self.open_client = entries, open_client  # one swap, no await
        return len(entries)

    @property
    def open(self) -> bool:
        return self.open_client is not None

    def identities(self) -> list[str]:
        """Every identity a request may be counted under now (bounded metric labels)."""
        if self.open_client is not None:
            return [self.open_client.identity]
        return sorted({entry.client.identity for entry in self._entries})

    def client(self, authorization: str | None) -> Client | None:
        """The client of an ``Authorization: Bearer <key>`` header, None if unknown.
        Every entry is compared (``hmac.compare_digest`` of two digests), so the time
        taken says nothing about which matched, or how much of a key was right."""
        if self.open_client is not None:
            return self.open_client
        presented = _presented(authorization)
        if presented is None:
            return None
        found = None
        for entry in self._entries:
            candidate = hashlib.sha256(entry.salt + presented).digest()
            if hmac.compare_digest(candidate, entry.digest) and found is None:
                found = entry.client
        return found

    @staticmethod
    def failure(authorization: str | None) -> str:
        """Why ``authorization`` let nobody in (one of :data:`AUTH_FAILURES`)."""
        if not authorization:
            return "missing"
        return "malformed" if _presented(authorization) is None else "unknown_key"


def _presented(authorization: str | None) -> bytes | None:
    """The key of a ``Bearer`` header as bytes; None if there is none, or it is not text
    (aiohttp hands non-UTF-8 header bytes over as surrogates)."""
    if not authorization or authorization[:7].lower() != "bearer ":
        return None
    try:
        return authorization[7:].strip().encode("utf-8")
    except UnicodeEncodeError:
        return None
