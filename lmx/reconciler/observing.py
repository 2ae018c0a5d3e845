"""`observe()`: one consistent look at the disk, the engines, memory and the loop's own records,
as an `ObservedState` for the planner.

Called by the reconcile loop at each step of a pass. Disk checks run on a worker thread (they
stat files and read small headers); engine and executor state is read on the loop thread.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import structlog

from lmx.reconciler.executor import Executor
from lmx.reconciler.failures import FailureBook
from lmx.reconciler.fetching import sizing_of
from lmx.reconciler.observed import ObservedModel, ObservedState
from lmx.reconciler.spec import DesiredState, LoadKey, ModelSpec, Want
from lmx.runtime.engine import EngineState
from lmx.runtime.memory import MemoryProbe, MemorySample
from lmx.runtime.registry import EngineRegistry
from lmx.runtime.sampling import SamplingDefaults, model_defaults
from lmx.runtime.store import Footprint, ModelStore

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class DiskFacts:
    downloaded: bool
    on_disk: bool
    estimate: Footprint | None = None  # from the files (or the Hub's list)
    footprint: Footprint | None = None  # the estimate, with measured weights if a load measured
    commit: str | None = None  # a Hub model's complete download is of this commit
    sampling: SamplingDefaults | None = None  # its generation_config.json's, once downloaded


class Observer:
    def __init__(
        self,
        *,
        registry: EngineRegistry,
        store: ModelStore,
        memory: MemoryProbe,
        executor: Executor,
        failures: FailureBook,
        clock: Callable[[], float],
    ) -> None:
        self._registry = registry
        self._store = store
        self._memory = memory
        self._executor = executor
        self._failures = failures
        self._clock = clock
        self._digests: dict[LoadKey, str] = {}
        self.disk: dict[str, DiskFacts] = {}  # the last disk facts, for status
        self.sample: MemorySample | None = None

    async def observe(
        self,
        desired: DesiredState,
        *,
        requested: Mapping[str, int],
        idled: Mapping[str, ModelSpec],
        record: bool = True,
    ) -> ObservedState:
        """Look once. `record=False` (a dry run) leaves the facts status reports untouched."""
        disk = await asyncio.to_thread(self._disk_facts, desired)
        sample = self._memory.sample()
        if record:
            self.disk, self.sample = disk, sample
        now = self._clock()
        ex = self._executor
        engines = self._registry.snapshot()
        jobs = ex.fetcher.jobs
        models: dict[str, ObservedModel] = {}
        others = sorted({*engines, *ex.loading, *jobs} - desired.models.keys())
        for mid in [*desired.models, *others]:  # declaration order: plans read the same each time
            spec = desired.models.get(mid)
            facts = disk.get(mid)
            eng = engines.get(mid)
            rec = ex.loaded.get(mid)
            drain = ex.drains.get(mid)
            fail = self._failures.current(mid, spec)
            models[mid] = ObservedModel(
                model_id=mid,
                downloaded=facts.downloaded if facts else False,
                downloading=mid in jobs,
                on_disk=facts.on_disk if facts else False,
                source_missing=bool(spec and spec.is_local and facts and not facts.downloaded),
                resident=eng is not None,
                loading=mid in ex.loading and eng is None,
                ready=eng is not None and eng.state is EngineState.READY and not eng.draining,
                loaded_key=rec.spec.load_key if rec else None,
                loaded_want=rec.want if rec else None,
                resident_bytes=eng.resident_bytes if eng else 0,
                in_flight=eng.in_flight if eng else 0,
                pid=eng.pid if eng else None,
                last_used_s=eng.last_used_s if eng else 0.0,
                request_ttl_s=eng.ttl_s if eng else None,
                draining=eng.draining if eng else False,
                drain_deadline_s=drain[0] if drain else None,
                drain_reason=drain[1] if drain else None,
                footprint_bytes=facts.footprint.total_bytes if facts and facts.footprint else None,
                requested=mid in requested,
                request_order=requested.get(mid, 0),
                idled=spec is not None and idled.get(mid) == spec,
                quarantine_reason=f"{fail.reason}: {fail.message}"
                if fail and fail.quarantined
                else None,
                retry_at_s=fail.retry_at_s if fail else None,
            )
        return ObservedState(
            now_s=now,
            total_memory_bytes=sample.total_bytes,
            unreleased_bytes=ex.releases.unreleased_bytes,
            releasing=ex.releases.releasing,
            models=models,
        )

    def _disk_facts(self, desired: DesiredState) -> dict[str, DiskFacts]:
        out = {}
        for mid, spec in desired.models.items():
            try:
                out[mid] = self._facts(mid, spec)
            except (OSError, ValueError) as exc:  # one unreadable model must not hide the others
                log.warning("model_files_unreadable", model=mid, error=str(exc))
                out[mid] = DiskFacts(False, False)
        return out

    def _facts(self, mid: str, spec: ModelSpec) -> DiskFacts:
        store = self._store
        if spec.want is Want.ABSENT:
            return DiskFacts(False, spec.prune and store.on_disk(spec.source, spec.revision))
        key = spec.load_key
        digest = self._digests.get(key)
        if digest is None:
            digest = self._digests[key] = spec.load_digest()
        est = store.estimate(mid, digest, spec.source, spec.revision, sizing_of(spec))
        measured = None if est is None else store.measured_bytes(mid, digest, est.weights_bytes)
        fp = est if est is None or measured is None else est.measured_as(measured)
        if spec.is_hub:
            commit = store.downloaded_commit(spec.source, spec.revision)
            downloaded = commit is not None
        else:
            commit, downloaded = None, store.is_downloaded(spec.source, spec.revision)
        sampling = model_defaults(store.locate(spec.source, spec.revision)) if downloaded else None
        return DiskFacts(downloaded, False, est, fp, commit, sampling)
