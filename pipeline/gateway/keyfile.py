"""The gateway's keys file (``[gateway] keys_file``): keys that change without a restart.

The file holds ``[[keys]]`` tables with the fields of ``[[gateway.keys]]``::

    [[keys]]
    identity = "team-a"
    key_hash = "sha256:...:..."   # hutch gateway --hash-key
    max_priority = 5

A file is read whole and checked whole: one bad entry refuses the file (the error names
the entry and field, never a key), so a half-edited file never revokes the keys in force.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationError

from pipeline.errors import ConfigError
from pipeline.gateway.settings import GatewayKey

__all__ = ["FileStamp", "read_keys_file", "stamp_of"]


@dataclass(frozen=True, slots=True)
class FileStamp:
    """What says a file changed: a new inode (replaced: a Kubernetes secret's symlink
    swap, ``mv``), a new size or a new modification time."""

    inode: int
    size: int
    mtime_ns: int


def stamp_of(path: str) -> FileStamp | None:
    """The file's stamp now (None: it does not exist or cannot be read)."""
    try:
        info = os.stat(path)
    except OSError:
        return None
    return FileStamp(info.st_ino, info.st_size, info.st_mtime_ns)


def read_keys_file(path: str) -> list[GatewayKey]:
    """Every key of the file; a ConfigError names ``gateway.keys_file`` and what is wrong."""
    where = f"gateway.keys_file ({path})"
    try:
        data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"{where}: cannot read it: {exc.strerror or exc}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{where}: not valid TOML: {exc}") from None
    unknown = sorted(set(data) - {"keys"})
    if unknown:
        raise ConfigError(f"{where}: unknown table or key {unknown[0]!r}: the file holds "
                          "only [[keys]] tables")
    entries = data.get("keys", [])
    if not isinstance(entries, list):
        raise ConfigError(f"{where}: 'keys' must be [[keys]] tables")
    keys = []
    for i, entry in enumerate(entries):
        try:
            keys.append(GatewayKey.model_validate(entry))
        except ValidationError as exc:
            first = exc.errors()[0]
            field = ".".join(str(part) for part in first["loc"])
            raise ConfigError(f"{where}: keys.{i}{'.' + field if field else ''}: "
                              f"{first['msg']}") from None
    identities = [key.identity for key in keys]
    for i, identity in enumerate(identities):
        if identity in identities[:i]:
            raise ConfigError(f"{where}: keys.{i}.identity: {identity!r} is defined twice")
    return keys
