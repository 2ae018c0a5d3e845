"""What performing one action came to: a frozen `Outcome`, never an exception.

The executor and the download jobs build them; the reconcile loop turns failures into backoff or
quarantine and publishes every outcome as an event.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from lmx.errors import PermanentError, TemporaryError
from lmx.reconciler.actions import Action, action_json
from lmx.reconciler.failures import INSUFFICIENT_DISK, JOURNAL_UNWRITABLE, OFFLINE
from lmx.reconciler.journal import JournalUnwritable
from lmx.runtime.downloads import InsufficientDisk, OfflineError


class Result(StrEnum):
    DONE = "done"
    STARTED = "started"  # runs on in the background (downloads); a later outcome reports the end
    DEFERRED = "deferred"  # not done, not a failure: busy, already running, waiting for room
    FAILED = "failed"
    SKIPPED = "skipped"  # not attempted (memory from an earlier unload has not come back)


@dataclass(frozen=True)
class Outcome:
    action: Action
    result: Result
    reason: str = ""  # machine-readable: LoadFailed, LoadTimeout, MemoryNotReleased, Busy, ...
    message: str = ""
    duration_s: float = 0.0
    permanent: bool = False  # retrying cannot help until the spec changes
    delay_s: float | None = None  # the error asked to wait at least this long
    unreleased_bytes: int = 0
    measured_bytes: int | None = None
    late: bool = False  # reported after the action's own timeout

    @property
    def model_id(self) -> str:
        return self.action.model_id

    @property
    def failed(self) -> bool:
        return self.result is Result.FAILED

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {**action_json(self.action), "result": str(self.result)}
        for key in ("reason", "message", "unreleased_bytes", "measured_bytes", "late"):
            if value := getattr(self, key):
                out[key] = value
        out["duration_s"] = round(self.duration_s, 4)
        return out


def failure(action: Action, exc: BaseException, *, duration_s: float) -> Outcome:
    """The outcome of an action that raised: LmxError subclasses say whether to retry."""
    if isinstance(exc, OfflineError):
        reason = OFFLINE
    elif isinstance(exc, InsufficientDisk):
        reason = INSUFFICIENT_DISK
    elif isinstance(exc, JournalUnwritable):
        reason = JOURNAL_UNWRITABLE
    else:
        reason = f"{type(action).__name__}Failed"  # LoadFailed, DownloadFailed, UnloadFailed
    return Outcome(
        action,
        Result.FAILED,
        reason=reason,
        message=f"{type(exc).__name__}: {exc}",
        duration_s=duration_s,
        permanent=isinstance(exc, PermanentError),
        delay_s=exc.delay_s if isinstance(exc, TemporaryError) else None,
    )
