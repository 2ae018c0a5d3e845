"""The declarative side of lmx: the desired state, the pure planner and the reconcile loop.

`Reconciler` and `ReconcilerSettings` are imported on first use, so that the pure modules
(spec, planning) load without the loop's dependencies (watchfiles, apscheduler, the Hub client).
"""

from typing import TYPE_CHECKING, Any

from lmx.reconciler.actions import (
    Action,
    Blocked,
    BlockReason,
    CancelDownload,
    Delete,
    Download,
    Drain,
    Evict,
    Load,
    Plan,
    Resume,
    Unload,
    UnloadReason,
    action_json,
    plan_json,
)
from lmx.reconciler.observed import ObservedModel, ObservedState
from lmx.reconciler.planning import plan
from lmx.reconciler.spec import DesiredState, ModelSpec, Want

if TYPE_CHECKING:
    from lmx.reconciler.loop import Reconciler
    from lmx.reconciler.settings import ReconcilerSettings


def __getattr__(name: str) -> Any:
    if name == "Reconciler":
        from lmx.reconciler.loop import Reconciler

        return Reconciler
    if name == "ReconcilerSettings":
        from lmx.reconciler.settings import ReconcilerSettings

        return ReconcilerSettings
    raise AttributeError(f"module 'lmx.reconciler' has no attribute {name!r}")


__all__ = [
    "Action",
    "BlockReason",
    "Blocked",
    "CancelDownload",
    "Delete",
    "DesiredState",
    "Download",
    "Drain",
    "Evict",
    "Load",
    "ModelSpec",
    "ObservedModel",
    "ObservedState",
    "Plan",
    "Reconciler",
    "ReconcilerSettings",
    "Resume",
    "Unload",
    "UnloadReason",
    "Want",
    "action_json",
    "plan",
    "plan_json",
]
