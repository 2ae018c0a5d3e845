"""One daemon per LMX_HOME: an exclusive `flock` on LMX_HOME/daemon.lock, held while it runs.

Taken by `lmx.daemon.run` before anything in the home is written (config, admin key, journal,
footprints). The OS releases the lock when the process ends in any way (kill -9 included), so a
restart after a crash is never blocked by a stale file. The file holds the holder's pid and port,
for the one-line error a second daemon prints; its content is a hint, the lock is the truth.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from pathlib import Path

LOCK_NAME = "daemon.lock"


class HomeInUse(Exception):
    """Another process holds the lock; `str()` is the line to show."""


class HomeLock:
    """Held from `acquire()` until `release()` or the end of the process. The descriptor is not
    inherited by child processes (a worker that outlived us must not keep the home locked)."""

    def __init__(self, home: Path) -> None:
        self.path = home / LOCK_NAME
        self._fd: int | None = None

    def acquire(self, *, port: int) -> None:
        """Take the lock and record our pid and port. Raises HomeInUse naming the home and, if
        it wrote them, the other daemon's pid and port; OSError if the home is not writable."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise HomeInUse(
                f"LMX_HOME {self.path.parent} is in use by another lmx daemon{holder};"
                " stop it, or give this one another LMX_HOME"
            ) from None
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps({"pid": os.getpid(), "port": port}) + "\n").encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the last descriptor releases the lock
            self._fd = None


def _holder(fd: int) -> str:
    """ " (pid 123, port 1234)" from the lock file, or "" if it says nothing usable."""
    with contextlib.suppress(OSError, ValueError):
        info = json.loads(os.pread(fd, 4096, 0).decode())
        parts = [f"{k} {int(info[k])}" for k in ("pid", "port") if k in info]
        if parts:
            return " (" + ", ".join(parts) + ")"
    return ""
