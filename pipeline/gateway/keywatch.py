"""Keys reloaded without a restart: ``keys_file`` watched, and reloads on demand (SIGHUP).

The watcher polls the file's stamp (inode, size, modification time) every
``keys_reload_s``: a poll, not inotify, so it sees a Kubernetes secret's symlink swap, an
``mv`` over the file, an NFS mount, and costs one ``stat`` per interval. A reload that
fails (a half-written file, a bad entry, an unset ``key_env``) keeps the keys in force, is
logged with what is wrong (never a key) and counted; the next change is tried again.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from pipeline.errors import ConfigError
from pipeline.gateway.auth import KeyRing
from pipeline.gateway.keyfile import stamp_of
from pipeline.observe.log import get_logger

__all__ = ["KeyWatcher"]

log = get_logger("hutch.gateway")


class KeyWatcher:
    """Reloads ``keys`` when ``path`` changes (:meth:`run`) or when asked (:meth:`reload`);
    ``reloaded(ok)`` hears of each attempt (metrics)."""

    def __init__(self, keys: KeyRing, path: str | None, interval_s: float,
                 reloaded: Callable[[bool], None]) -> None:
        self._keys = keys
        self._path = path
        self._interval_s = interval_s
        self._reloaded = reloaded
        self._stamp = stamp_of(path) if path is not None else None

    def reload(self, why: str) -> bool:
        """Read the keys again now; False (old keys kept) if they do not load."""
        try:
            count = self._keys.reload()
        except ConfigError as exc:
            log.error("gateway.keys_reload_failed", why=why, error=str(exc))
            self._reloaded(False)
            return False
        log.info("gateway.keys_reloaded", why=why, keys=count,
                 clients=self._keys.identities())
        self._reloaded(True)
        return True

    async def run(self) -> None:
        """Poll the keys file until cancelled (returns at once without one)."""
        if self._path is None:
            return
        while True:
            await asyncio.sleep(self._interval_s)
            stamp = stamp_of(self._path)
            if stamp != self._stamp:
                self._stamp = stamp
                self.reload("file changed")
