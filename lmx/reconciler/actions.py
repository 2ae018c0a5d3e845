"""What a plan is made of: actions, blocked items and their reasons. Plain frozen values.

Built by the planner, performed by the executor, shown by `lmx plan` and `/admin/plan`.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from lmx.reconciler.spec import Want


class UnloadReason(StrEnum):
    NOT_DECLARED = "NotDeclared"
    WANT_ABSENT = "WantAbsent"
    DEMOTED = "Demoted"  # loaded as resident or pinned, now only `downloaded`
    SPEC_CHANGED = "SpecChanged"  # load parameters changed: unload, then load again
    IDLE_TIMEOUT = "IdleTimeout"
    DRAINED = "Drained"  # a drain started earlier; finish it
    EVICTED = "Evicted"  # room for another model


class BlockReason(StrEnum):
    EXCEEDS_BUDGET = "ExceedsBudget"  # the model alone does not fit the budget
    PINS_EXCEED_BUDGET = "PinsExceedBudget"  # the pins declared up to this one do not fit
    INSUFFICIENT_MEMORY = "InsufficientMemory"  # no room, and evicting cannot (or may not) make it
    MEMORY_NOT_RELEASED = "MemoryNotReleased"  # room is expected once an unload's memory is back
    WAITING_FOR_DRAIN = "WaitingForDrain"  # room comes when busy models finish their requests
    # The room is promised to models loading or loaded for requests ahead of it: each may be
    # evicted once loaded and served, and the model is planned again then.
    WAITING_FOR_TURN = "WaitingForTurn"
    DRAINING = "Draining"  # this model waits for its in-flight requests before unloading
    QUARANTINED = "Quarantined"
    BACKING_OFF = "BackingOff"
    SOURCE_MISSING = "SourceMissing"
    FOOTPRINT_UNKNOWN = "FootprintUnknown"
    JIT_DISABLED = "JitDisabled"


# Reasons a waiting request should be told about now rather than keep waiting for.
TERMINAL_REASONS = frozenset(
    {
        BlockReason.EXCEEDS_BUDGET,
        BlockReason.PINS_EXCEED_BUDGET,
        BlockReason.INSUFFICIENT_MEMORY,
        BlockReason.QUARANTINED,
        BlockReason.SOURCE_MISSING,
        BlockReason.FOOTPRINT_UNKNOWN,
        BlockReason.JIT_DISABLED,
    }
)


@dataclass(frozen=True)
class Drain:
    """Stop admitting requests to `model_id`; it is unloaded once its requests finish."""

    model_id: str
    reason: UnloadReason
    for_model: str | None = None


@dataclass(frozen=True)
class Resume:
    """Admit requests to `model_id` again: what began its drain no longer holds (the change
    that began it was undone), so it stays loaded."""

    model_id: str


@dataclass(frozen=True)
class Unload:
    model_id: str
    reason: UnloadReason
    forced: bool = False  # the drain deadline passed with requests still in flight


@dataclass(frozen=True)
class Evict:
    """Unload the least recently used model to make room for `for_model`."""

    model_id: str
    for_model: str
    freed_bytes: int


@dataclass(frozen=True)
class CancelDownload:
    model_id: str


@dataclass(frozen=True)
class Delete:
    model_id: str


@dataclass(frozen=True)
class Download:
    model_id: str


@dataclass(frozen=True)
class Load:
    model_id: str
    footprint_bytes: int
    why: Want  # PINNED, RESIDENT, or DOWNLOADED for a load on request


Action = Resume | Drain | Unload | Evict | CancelDownload | Delete | Download | Load


@dataclass(frozen=True)
class Blocked:
    model_id: str
    reason: BlockReason
    message: str


@dataclass(frozen=True)
class Plan:
    actions: tuple[Action, ...]
    blocked: tuple[Blocked, ...]
    budget_bytes: int
    used_bytes: int  # charged after the plan's actions, as admitted
    requeue_after_s: float | None  # when time alone will change the plan (TTL, drain, backoff)

    @property
    def is_empty(self) -> bool:
        return not self.actions

    def blocked_for(self, model_id: str) -> Blocked | None:
        return next((b for b in self.blocked if b.model_id == model_id), None)


def action_json(action: Action) -> dict[str, Any]:
    """`{"action": "Load", "model": ..., ...}` for logs, events and the admin API."""
    fields = {k: (str(v) if isinstance(v, StrEnum) else v) for k, v in vars(action).items()}
    if isinstance(action, Load) and action.why is Want.DOWNLOADED:
        fields["why"] = "request"  # the class of loads on request, whatever the model's want
    model = fields.pop("model_id")
    return {"action": type(action).__name__, "model": model, **fields}


def plan_json(plan: Plan) -> dict[str, Any]:
    return {
        "actions": [action_json(a) for a in plan.actions],
        "blocked": [
            {"model": b.model_id, "reason": str(b.reason), "message": b.message}
            for b in plan.blocked
        ],
        "budget_bytes": plan.budget_bytes,
        "used_bytes": plan.used_bytes,
        "requeue_after_s": plan.requeue_after_s,
    }
