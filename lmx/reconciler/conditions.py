"""Per-model conditions (`Downloaded`, `Resident`, `Ready`, `Draining`, `Degraded`,
`Quarantined`) derived from what a pass observed and planned, with their transition times.

`derive` is pure; `ConditionBook` keeps the last value of each condition and stamps a transition
time when a status flips (Kubernetes' rule). Written by the reconcile loop only.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from lmx.reconciler.actions import Blocked
from lmx.reconciler.failures import DOWNLOAD_REASONS, Failure
from lmx.reconciler.observed import ObservedModel
from lmx.reconciler.spec import ModelSpec, Want
from lmx.units import fmt_bytes


class ConditionType(StrEnum):
    DOWNLOADED = "Downloaded"
    RESIDENT = "Resident"
    READY = "Ready"
    DRAINING = "Draining"
    DEGRADED = "Degraded"
    QUARANTINED = "Quarantined"
    CONFIG_VALID = "ConfigValid"  # top level, not per model


@dataclass(frozen=True)
class Condition:
    type: ConditionType
    status: bool
    reason: str
    message: str = ""
    last_transition_s: float = 0.0  # wall clock

    def to_json(self) -> dict[str, Any]:
        when = datetime.fromtimestamp(self.last_transition_s, UTC)
        return {
            "type": str(self.type),
            "status": self.status,
            "reason": self.reason,
            "message": self.message,
            "lastTransitionTime": when.isoformat(timespec="milliseconds"),
        }


Values = list[tuple[ConditionType, bool, str, str]]


def derive(
    spec: ModelSpec | None,
    o: ObservedModel,
    blocked: Blocked | None,
    failure: Failure | None,
    *,
    unreleased_bytes: int = 0,
    progress: str = "",
) -> Values:
    """The conditions of one model (declared, or loaded and no longer declared)."""
    b_reason, b_msg = (str(blocked.reason), blocked.message) if blocked else ("", "")
    want = spec.want if spec else None
    out: Values = []
    if spec is not None:
        if o.downloaded:
            out.append((ConditionType.DOWNLOADED, True, "Downloaded", spec.source))
        elif o.downloading:
            out.append((ConditionType.DOWNLOADED, False, "Downloading", progress))
        elif failure is not None and failure.reason in DOWNLOAD_REASONS:
            # Offline, InsufficientDisk, DownloadFailed; with when the next try comes, if one does.
            retry = f"; {b_msg}" if b_msg and not failure.quarantined else ""
            out.append((ConditionType.DOWNLOADED, False, failure.reason, failure.message + retry))
        else:
            out.append((ConditionType.DOWNLOADED, False, b_reason or "NotDownloaded", b_msg))
    if o.resident:
        out.append((ConditionType.RESIDENT, True, "Loaded", fmt_bytes(o.resident_bytes)))
    elif o.loading:
        out.append((ConditionType.RESIDENT, False, "Loading", ""))
    elif o.idled:
        out.append((ConditionType.RESIDENT, False, "IdleTimeout", "loads on the next request"))
    else:
        out.append((ConditionType.RESIDENT, False, b_reason or "NotLoaded", b_msg))
    if o.ready:
        ready = (True, "Ready", "")
    elif o.draining:
        ready = (False, "Draining", f"{o.in_flight} request(s) in flight")
    elif o.loading:
        ready = (False, "Loading", "")
    elif blocked is not None:
        ready = (False, b_reason, b_msg)
    elif want is Want.ABSENT or spec is None:
        ready = (False, "NotWanted", "")
    elif want is Want.DOWNLOADED or o.idled:
        ready = (False, "LoadsOnRequest", "")
    elif failure is not None:
        ready = (False, failure.reason, failure.message)
    else:
        ready = (False, "NotLoaded", "")
    out.append((ConditionType.READY, *ready))
    drain_msg = f"{o.in_flight} request(s) in flight" if o.draining else ""
    out.append((ConditionType.DRAINING, o.draining, "Draining" if o.draining else "", drain_msg))
    if failure is not None and not failure.quarantined:
        msg = f"{failure.message} (failure {failure.count})"
        out.append((ConditionType.DEGRADED, True, failure.reason, msg))
    elif unreleased_bytes:
        msg = f"{fmt_bytes(unreleased_bytes)} not returned after unloading"
        out.append((ConditionType.DEGRADED, True, "MemoryNotReleased", msg))
    else:
        out.append((ConditionType.DEGRADED, False, "", ""))
    if failure is not None and failure.quarantined:
        out.append((ConditionType.QUARANTINED, True, failure.reason, failure.message))
    else:
        out.append((ConditionType.QUARANTINED, False, "", ""))
    return out


class ConditionBook:
    def __init__(self) -> None:
        self._by_model: dict[str, dict[ConditionType, Condition]] = {}

    def get(self, model_id: str) -> dict[ConditionType, Condition]:
        return self._by_model.get(model_id, {})

    def update(self, model_id: str, values: Values, now_wall_s: float) -> list[Condition]:
        """Store new values; return the conditions whose status or reason changed."""
        current = self._by_model.setdefault(model_id, {})
        changed = []
        for ctype, status, reason, message in values:
            prev = current.get(ctype)
            when = now_wall_s if prev is None or prev.status != status else prev.last_transition_s
            cond = Condition(ctype, status, reason, message, when)
            current[ctype] = cond
            if prev is None or (prev.status, prev.reason) != (status, reason):
                changed.append(cond)
        return changed

    def forget(self, keep: set[str]) -> None:
        for mid in [m for m in self._by_model if m not in keep]:
            del self._by_model[mid]
