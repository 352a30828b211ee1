"""Changing a running worker's configuration: ``SIGHUP`` or a file watch.

A reload reads the config file again and either applies all of it or none of it:

1. **parse and validate** (:func:`~pipeline.settings.load_settings`, environment
   overrides included, as at start): an invalid file is ``invalid``, naming the bad key;
2. **diff** against the running settings (:mod:`pipeline.worker.config_diff`): a key a
   running worker cannot change is ``refused`` (restart the worker for it);
3. **check the topology** the new settings need (:mod:`pipeline.worker.reload_topology`):
   a missing queue or binding is ``refused``, naming what ``hutch topology apply``
   must create first;
4. **apply** in place, in this order: new pools (admission, scheduler, presence, pause
   state), the settings themselves (each pool's dispatcher, for requests that start from
   now on), swapped backends (a new cap through the backend's capacity controller and its
   admission's ``set_limit``; a new URL as a new HTTP client for new requests), new
   backends (a slot competing for its lease), removed backends (no new requests, the
   running ones finish, the lease is given up), removed pools (after their backends).

Every change is one log line (``config.change``); the reload one more
(``config.reloaded`` or ``config.reload_failed``) and the counter
``hutch_config_reloads_total{result}``: ``applied``, ``unchanged``, ``invalid``,
``refused`` or ``failed`` (a bug while applying: what was applied stays, the log says so).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pipeline.errors import ConfigError
from pipeline.observe.log import get_logger
from pipeline.observe.metrics import Metrics
from pipeline.settings import Settings, load_settings
from pipeline.worker.config_diff import ConfigDiff, accepting, diff_settings, moved_models
from pipeline.worker.reload_topology import check_topology, needs_of
from pipeline.worker.slots import AMQP_ERRORS

if TYPE_CHECKING:
    from pipeline.worker.worker import Worker

__all__ = ["FileWatch", "ReloadResult", "Reloader", "reload_triggers"]

log = get_logger("hutch.worker")

Result = Literal["applied", "unchanged", "invalid", "refused", "failed"]


@dataclass(frozen=True)
class ReloadResult:
    """What a reload did: its result, why (if not applied), and the changes."""

    result: Result
    reason: str = ""
    changes: list[dict[str, object]] = field(default_factory=list)
    #: Removed backends still draining: done when these tasks are.
    retiring: tuple[asyncio.Task[None], ...] = ()


class Reloader:
    """Reloads ``worker``'s configuration from ``path``, one reload at a time."""

    def __init__(self, worker: Worker, path: str | Path,
                 load: Callable[[str | Path], Settings] = load_settings) -> None:
        self._worker = worker
        self._path = path
        self._load = load
        self._lock = asyncio.Lock()

    @property
    def metrics(self) -> Metrics:
        return self._worker.metrics

    async def reload(self) -> ReloadResult:
        """Read the file and apply it whole, or change nothing and say why."""
        async with self._lock:
            outcome = await self._reload()
        self.metrics.child(self.metrics.config_reloads, outcome.result).inc()
        stamp = self._worker.stamp
        if outcome.result in ("applied", "unchanged"):
            log.info("config.reloaded", result=outcome.result, path=str(self._path),
                     generation=stamp.generation, hash=stamp.hash,
                     changes=len(outcome.changes))
        else:
            log.error("config.reload_failed", result=outcome.result, path=str(self._path),
                      reason=outcome.reason, running_generation=stamp.generation,
                      running_hash=stamp.hash)
        return outcome

    async def _reload(self) -> ReloadResult:
        worker = self._worker
        try:
            new = self._load(self._path)
        except ConfigError as exc:
            return ReloadResult("invalid", str(exc))
        except OSError as exc:
            return ReloadResult("invalid", f"{self._path}: {exc.strerror or exc}")
        if not new.pools:
            return ReloadResult("invalid", f"{self._path}: no [[pools]] defined")
        diff = diff_settings(worker.settings, new)
        if diff.restart:
            return ReloadResult("refused", "needs a restart: " + "; ".join(diff.restart))
        if diff.empty:
            if diff.broker_only:
                log.info("config.broker_only", keys=list(diff.broker_only),
                         note="the broker's policy holds these: `hutch topology apply`")
                worker.commit(new, worker.stamp.next(new))
            return ReloadResult("unchanged")
        refusal = await self._topology_refusal(new, diff)
        if refusal:
            return ReloadResult("refused", refusal)
        try:
            retiring = await self._apply(new, diff)
        except Exception as exc:  # a bug: say what was left, keep serving
            log.error("config.apply_crashed", exc_info=True)
            return ReloadResult("failed", f"applying crashed part way: {exc!r}")
        return ReloadResult("applied", changes=diff.describe(), retiring=retiring)

    async def _topology_refusal(self, new: Settings, diff: ConfigDiff) -> str:
        """Why the broker cannot take ``new`` yet ("" if it can)."""
        worker = self._worker
        needs = needs_of(worker.settings, new, diff)
        if not needs.queues and not needs.bindings:
            return ""
        connection = worker.slots.connection
        if connection is None:
            return "not connected to the broker: its topology cannot be checked; try again"
        try:
            check = await check_topology(connection, new, needs)
        except AMQP_ERRORS as exc:
            return f"the broker's topology could not be checked ({exc!r}); try again"
        if check.missing:
            return ("the broker lacks " + ", ".join(check.missing) + ": run `hutch topology "
                    f"apply --config {self._path}` first (`hutch topology diff` lists it)")
        if check.unverified:
            log.warning("config.bindings_unverified", bindings=check.unverified,
                        reason=check.why_unverified,
                        note="run `hutch topology diff` to be sure they exist")
        return ""

    async def _apply(self, new: Settings, diff: ConfigDiff
                     ) -> tuple[asyncio.Task[None], ...]:
        worker = self._worker
        for change in diff.of_pools("added"):
            if change.new is not None:
                worker.add_pool(change.new, new)
        moved = moved_models(worker.settings, new)
        worker.commit(new, worker.stamp.next(new), accepting(new, moved))
        if moved:
            log.warning("config.apply_next", moved=moved, note="requests for these models "
                        "reach their old pool (still served) until `hutch topology apply`: "
                        "run it once every worker has reloaded")
        # One new client per backend, recapped and repointed at once or not.
        swapped = {b.name: b.new for b in diff.of_backends("recapped", "repointed") if b.new}
        for settings in swapped.values():
            worker.swap_backend(settings)
        try:  # new pools joined (and their pause read) before their backends take leases
            await worker.announce()
        except AMQP_ERRORS as exc:  # the next session joins and shows it anyway
            log.warning("config.announce_failed", error=repr(exc))
        for backend in diff.of_backends("added"):
            if backend.new is not None:
                worker.add_backend(new.pool(backend.pool), backend.new)
        retiring = [worker.slots.retire(backend.name)
                    for backend in diff.of_backends("removed")]
        removed_pools = [change.name for change in diff.of_pools("removed")]
        if removed_pools:
            retiring.append(asyncio.ensure_future(
                self._leave_after(removed_pools, list(retiring))))
        for line in diff.describe():
            log.info("config.change", **line)
        return tuple(retiring)

    async def _leave_after(self, pools: list[str], retiring: list[asyncio.Task[None]]
                           ) -> None:
        await asyncio.gather(*retiring, return_exceptions=True)
        for pool in pools:
            await self._worker.leave_pool(pool)


class FileWatch:
    """Reload when the file's modification time changes (polled: no inotify needed, and
    it works on a Kubernetes ConfigMap's symlink swap as well)."""

    def __init__(self, reloader: Reloader, path: str | Path, interval_s: float) -> None:
        self._reloader = reloader
        self._path = Path(path)
        self._interval_s = interval_s

    def _mtime(self) -> float | None:
        try:
            return os.stat(self._path).st_mtime
        except OSError:
            return None

    async def run(self) -> None:
        seen = self._mtime()
        while True:
            await asyncio.sleep(self._interval_s)
            now = self._mtime()
            if now is not None and now != seen:
                seen = now
                await self._reloader.reload()


@contextlib.asynccontextmanager
async def reload_triggers(worker: Worker, path: str | Path | None, watch_s: float | None
                          ) -> AsyncIterator[None]:
    """While the block runs, SIGHUP (and, with ``watch_s``, a change of the file) reloads
    ``path``. Without a file (settings from the environment only) SIGHUP says that it
    cannot reload rather than ending the process, as its default action would."""
    loop = asyncio.get_running_loop()
    tasks: set[asyncio.Future[Any]] = set()
    reloader = Reloader(worker, path) if path is not None else None

    def hangup() -> None:
        if reloader is None:
            log.error("config.reload_failed", result="invalid",
                      reason="the worker was started without --config: nothing to reload")
            return
        task = asyncio.ensure_future(reloader.reload())
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    loop.add_signal_handler(signal.SIGHUP, hangup)
    if reloader is not None and path is not None and watch_s:
        tasks.add(asyncio.ensure_future(FileWatch(reloader, path, watch_s).run()))
    try:
        yield
    finally:
        loop.remove_signal_handler(signal.SIGHUP)
        for task in list(tasks):
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
