"""Triggers that wake the reconcile loop: edits of the config file and a periodic resync.

They only call `wake(reason)`; the loop does all the work. The watcher watches the config file's
directory, not the file, because editors save by writing a new file and renaming it over the old.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from pathlib import Path

import structlog
import watchfiles
from apscheduler.schedulers.asyncio import AsyncIOScheduler

from lmx.reconciler.settings import ReconcilerSettings

log = structlog.get_logger(__name__)


class Triggers:
    def __init__(
        self,
        settings: ReconcilerSettings,
        *,
        config_path: Path | None,
        wake: Callable[[str], None],
    ) -> None:
        self._s = settings
        self._path = config_path
        self._wake = wake
        self._stop = asyncio.Event()
        self._watcher: asyncio.Task[None] | None = None
        self._scheduler: AsyncIOScheduler | None = None

    async def start(self) -> None:
        self._scheduler = AsyncIOScheduler()
        self._scheduler.add_job(
            self._wake, "interval", seconds=self._s.resync_interval_s, args=["resync"]
        )
        self._scheduler.start()
        if self._s.watch_config and self._path is not None:
            self._watcher = asyncio.create_task(self._watch(self._path))
            # The watcher registers with the OS in its first step, before it first suspends.
            await asyncio.sleep(0)

    async def stop(self) -> None:
        self._stop.set()
        if self._scheduler is not None:
            self._scheduler.shutdown(wait=False)
            self._scheduler = None
        if self._watcher is not None:
            with contextlib.suppress(TimeoutError, asyncio.CancelledError):
                async with asyncio.timeout(5.0):
                    await self._watcher
            self._watcher = None

    async def _watch(self, path: Path) -> None:
        directory, name = path.parent.resolve(), path.name

        def ours(_: watchfiles.Change, changed: str) -> bool:
            return Path(changed).name == name

        if not directory.is_dir():
            log.warning("config_dir_missing", path=str(directory))
            return
        log.info("config_watch_started", path=str(path))
        async for _ in watchfiles.awatch(
            directory,
            watch_filter=ours,
            stop_event=self._stop,
            debounce=self._s.watch_debounce_ms,
            step=min(20, self._s.watch_debounce_ms),  # quiet time that ends a burst of events
            recursive=False,
        ):
            self._wake("config_changed")
