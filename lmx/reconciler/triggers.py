"""Triggers that wake the reconcile loop: edits of the config file and a periodic resync.

They only call `wake(reason)`; the loop does all the work. The watcher watches the config file's
directory, not the file, because editors save by writing a new file and renaming it over the old;
for a symlinked file, its target's directory too. A burst of events is read once it has settled.
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

# How often the watcher checks that the directories it watches are still the ones there.
_RECHECK_S = 1.0


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
        # Synchronous up to the first suspension: the OS watch is in place when start() returns.
        while not self._stop.is_set():
            watched = _watched(path)
            directories = sorted({p.parent for p in watched})

            def ours(_: watchfiles.Change, changed: str, watched: set[Path] = watched) -> bool:
                return Path(changed) in watched

            if missing := [d for d in directories if not d.is_dir()]:
                # A link to a volume not mounted, a dotfiles repo moved: watched once it is back.
                log.warning("config_dir_missing", path=str(missing[0]))
                while not self._stop.is_set() and not all(d.is_dir() for d in directories):
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._stop.wait(), _RECHECK_S)
                self._wake("config_changed")
                continue
            log.info("config_watch_started", path=str(path), files=sorted(map(str, watched)))
            identity = _identity(directories)
            changes = watchfiles.awatch(
                *directories,
                watch_filter=ours,
                stop_event=self._stop,
                debounce=max(self._s.watch_debounce_ms, self._s.watch_settle_ms),
                step=self._s.watch_settle_ms,  # quiet time that ends a burst of events
                rust_timeout=int(_RECHECK_S * 1000),
                yield_on_timeout=True,  # an empty set: time to check the directories
                recursive=False,
            )
            async with contextlib.aclosing(changes):
                async for changed in changes:
                    if changed:
                        self._wake("config_changed")
                    if _watched(path) != watched:
                        break  # the file became a symlink, or its link was re-pointed
                    if _identity(directories) != identity:
                        # A directory replaced (`mv repo repo.old; mkdir repo`): the OS watches
                        # the old one. The file in the new one may differ too.
                        self._wake("config_changed")
                        break


def _identity(directories: list[Path]) -> list[tuple[int, int] | None]:
    """Which directories these paths are (None: none is there now)."""
    out: list[tuple[int, int] | None] = []
    for d in directories:
        try:
            st = d.stat()
        except OSError:
            out.append(None)
        else:
            out.append((st.st_dev, st.st_ino))
    return out


def _watched(path: Path) -> set[Path]:
    """The file's path in its directory (a save by rename replaces it there) and, for a symlink,
    its target's path (the target edited in place or saved by rename in its own directory)."""
    return {path.parent.resolve() / path.name, path.resolve()}
