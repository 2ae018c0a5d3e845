"""The planner: `plan(desired, observed) -> Plan`, a pure function of its two arguments.

No I/O, no clock, no logging: the reconcile loop observes, calls this, and hands the plan to the
executor. Actions come out in execution order (drains, unloads and evictions, cancels, deletes,
downloads, loads; loads by priority: pins, then requests first come first served, then resident
models), each load admitted against the memory budget after the memory that the plan frees
(`admission.py`).
"""

from __future__ import annotations

from lmx.reconciler.actions import CancelDownload, Delete, Plan, UnloadReason
from lmx.reconciler.admission import Admission, idle_ttl_s
from lmx.reconciler.observed import ObservedModel, ObservedState
from lmx.reconciler.spec import DesiredState, ModelSpec, Want


def removal_reason(spec: ModelSpec | None, o: ObservedModel, now_s: float) -> UnloadReason | None:
    """Why a loaded engine should go now, or None if it stays: a drain goes on while what began
    it holds (an eviction's always: the room went to another model), else it is called off."""
    reason = _removal_reason(spec, o, now_s)
    if reason is None and o.draining and o.drain_reason in (UnloadReason.EVICTED, None):
        return UnloadReason.DRAINED
    return reason


def _removal_reason(spec: ModelSpec | None, o: ObservedModel, now_s: float) -> UnloadReason | None:
    if spec is None:
        return UnloadReason.NOT_DECLARED
    if spec.want is Want.ABSENT:
        return UnloadReason.WANT_ABSENT
    if o.loaded_key is not None and o.loaded_key != spec.load_key:
        return UnloadReason.SPEC_CHANGED
    if o.requested:
        return None  # a request waits for it: neither demotion nor idleness applies
    if spec.want is Want.DOWNLOADED and o.loaded_want in (Want.RESIDENT, Want.PINNED):
        return UnloadReason.DEMOTED
    ttl = idle_ttl_s(spec, o)
    idle = ttl is not None and o.in_flight == 0 and now_s - o.last_used_s >= ttl
    return UnloadReason.IDLE_TIMEOUT if idle else None


def plan(desired: DesiredState, observed: ObservedState) -> Plan:
    """The actions that move `observed` toward `desired` now, what is blocked, and why."""
    now = observed.now_s
    adm = Admission(desired, observed, desired.memory.budget_bytes(observed.total_memory_bytes))

    # 1. Loaded engines: keep, or unload (draining busy ones first).
    for mid, o in observed.models.items():
        if o.loading:
            adm.hold(o)
        elif o.resident:
            spec = desired.models.get(mid)
            reason = removal_reason(spec, o, now)
            if reason is None and spec is not None:
                adm.keep(spec, o)
            elif reason is not None:
                adm.remove(o, reason)

    # 2. Declared models: cancels, deletes, downloads and load candidates.
    # The files of a repo at a revision: another revision's are in a directory of their own.
    sources_in_use: set[tuple[str, str]] | None = None
    for mid, spec in desired.models.items():
        o = observed.models.get(mid) or ObservedModel(mid)
        want = spec.want
        if want is Want.ABSENT:
            if o.downloading:
                adm.cancels.append(CancelDownload(mid))
            gone = not o.loading and (not o.resident or mid in adm.leaving)
            if spec.prune and o.on_disk and not spec.is_local and gone:
                if sources_in_use is None:
                    sources_in_use = {
                        (s.source, s.revision)
                        for s in desired.models.values()
                        if s.want is not Want.ABSENT
                    }
                if (spec.source, spec.revision) not in sources_in_use:
                    adm.deletes.append(Delete(mid))
            continue
        if want is Want.PINNED:
            adm.note_pin(o)
        if o.downloaded:
            adm.consider_load(spec, o)
        elif not o.downloading:
            adm.consider_download(spec, o)
    for mid, o in observed.models.items():
        if o.downloading and mid not in desired.models:
            adm.cancels.append(CancelDownload(mid))

    # 3. Loads in priority order against the budget, evicting for pins and requests only.
    adm.admit()
    return adm.result()
