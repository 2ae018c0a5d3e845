"""The observed state: what the reconcile loop saw of the disk, the engines and memory.

Plain frozen values, built by `observing.py` once per pass and read by the pure planner. Times are
the loop's monotonic clock (`now_s`), so the planner needs no clock of its own.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from lmx.reconciler.actions import UnloadReason
from lmx.reconciler.spec import LoadKey, Want


@dataclass(frozen=True)
class ObservedModel:
    """One model as observed: declared, on disk, or loaded (any combination)."""

    model_id: str
    # disk
    downloaded: bool = False  # complete for the declared source and revision
    downloading: bool = False  # a download task is running or queued
    on_disk: bool = False  # some file lmx owns exists (for Delete)
    source_missing: bool = False  # a local directory that does not exist
    # engine (registry)
    resident: bool = False
    loading: bool = False  # a load task is running (including one past its timeout)
    ready: bool = False
    loaded_key: LoadKey | None = None  # the spec's load_key the engine was loaded with
    loaded_want: Want | None = None  # the spec's want when it was loaded
    resident_bytes: int = 0
    in_flight: int = 0
    pid: int | None = None  # the engine's worker process
    last_used_s: float = 0.0
    request_ttl_s: float | None = None  # the idle TTL its latest request asked for, if any
    draining: bool = False
    drain_deadline_s: float | None = None
    drain_reason: UnloadReason | None = None  # why its drain began
    # admission
    footprint_bytes: int | None = None  # measured if known, else estimated; None if unknown
    # the loop's memory of this model (each reset when the model's spec changes)
    requested: bool = False  # a request waits for it (ensure_ready)
    request_order: int = 0  # where the first request waiting for it came among requests
    idled: bool = False  # unloaded after idle_ttl: reload on request only
    quarantine_reason: str | None = None
    retry_at_s: float | None = None  # backing off after a failure until then

    @property
    def charge_bytes(self) -> int:
        """What a loaded engine counts against the budget: its reservation or more if it grew."""
        return max(self.footprint_bytes or 0, self.resident_bytes)


@dataclass(frozen=True)
class ObservedState:
    now_s: float
    total_memory_bytes: int
    # Bytes an unload should have returned and did not (counted as used).
    unreleased_bytes: int = 0
    # True while that memory is still within its grace period (loads that need it wait).
    releasing: bool = False
    models: Mapping[str, ObservedModel] = field(default_factory=dict)

    def model(self, model_id: str) -> ObservedModel:
        return self.models.get(model_id) or ObservedModel(model_id)
