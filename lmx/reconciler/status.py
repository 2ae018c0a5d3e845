"""What the reconciler reports: per-model conditions (kept up to date after each pass), the
JSON status document for `/admin/status` and `lmx status`, and the list of servable names.

Written by the reconcile loop (`update_conditions`); read by anyone. Reads the loop's components,
never changes them.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from lmx.reconciler.actions import Plan, plan_json
from lmx.reconciler.admission import idle_ttl_s, never_fits, pinned_bytes
from lmx.reconciler.conditions import ConditionBook, ConditionType, derive
from lmx.reconciler.events import EventBus
from lmx.reconciler.executor import Executor
from lmx.reconciler.failures import FailureBook
from lmx.reconciler.fetching import Job, sizing_of
from lmx.reconciler.observed import ObservedModel, ObservedState
from lmx.reconciler.observing import DiskFacts, Observer
from lmx.reconciler.spec import DesiredState, ModelSpec, Want
from lmx.runtime.engine import EngineState
from lmx.runtime.registry import EngineRegistry, ResidentModel
from lmx.runtime.store import Footprint, ModelStore

_CONFIG = ""  # the condition book's key for top-level conditions (model ids are never empty)


def _iso(wall_s: float) -> str:
    return datetime.fromtimestamp(wall_s, UTC).isoformat(timespec="milliseconds")


@dataclass(frozen=True)
class Listed:
    """A name a request may use, as a model list shows it (LM Studio's /api/v0/models)."""

    name: str  # the model's id, or an alias of it
    model_id: str
    source: str
    path: Path  # where its files are
    state: str  # loaded, loading or not-loaded
    context_length: int | None  # the loaded model's, else its spec's (None: the model's own)


@dataclass(frozen=True)
class Head:
    """The loop's top-level state at the moment status is asked for."""

    desired: DesiredState
    generation: int
    observed_generation: int
    config_path: str | None
    config_error: str | None
    last_pass: dict[str, Any]


def config_json(path: str | None, error: str | None, generation: int) -> dict[str, Any]:
    """The config file's validity, as /admin/status and /admin/plan show it. While it is invalid,
    `last_good_kept` says whether a state it had (or had before a restart) serves, or none yet,
    and so no model."""
    return {"path": path, "valid": error is None, "error": error, "last_good_kept": generation > 0}


class StatusView:
    def __init__(
        self,
        *,
        registry: EngineRegistry,
        store: ModelStore,
        executor: Executor,
        observer: Observer,
        failures: FailureBook,
        events: EventBus,
        clock: Callable[[], float],
    ) -> None:
        self._registry = registry
        self._store = store
        self._executor = executor
        self._observer = observer
        self._failures = failures
        self._events = events
        self._clock = clock
        self.conditions = ConditionBook()
        self.observed: ObservedState | None = None
        self.plan: Plan | None = None

    def pin_footprints(self, desired: DesiredState) -> dict[str, int | None]:
        """Footprints of the pinned models, from disk or earlier estimates. Blocking."""
        out: dict[str, int | None] = {}
        for mid, spec in desired.models.items():
            if spec.want is Want.PINNED:
                fp = self._store.footprint(
                    mid, spec.load_digest(), spec.source, spec.revision, sizing_of(spec)
                )
                out[mid] = fp.total_bytes if fp else None
        return out

    def update_conditions(self, desired: DesiredState, observed: ObservedState, plan: Plan) -> None:
        """Derive every model's conditions after a pass; publish the ones that changed."""
        self.observed, self.plan = observed, plan
        blocked = {b.model_id: b for b in plan.blocked}
        leaks = self._executor.releases.leaks
        jobs = self._executor.fetcher.jobs
        now_wall = time.time()
        for mid, o in observed.models.items():
            spec = desired.models.get(mid)
            job = jobs.get(mid)
            values = derive(
                spec,
                o,
                blocked.get(mid),
                self._failures.current(mid, spec),
                unreleased_bytes=leaks[mid].bytes if mid in leaks else 0,
                progress=job.describe() if job else "",
            )
            for cond in self.conditions.update(mid, values, now_wall):
                self._events.publish("condition_changed", model=mid, condition=cond.to_json())
        self.conditions.forget(set(observed.models) | set(leaks) | {_CONFIG})

    def update_config(self, error: str | None) -> None:
        """The top-level ConfigValid condition, after each read of the config file."""
        value = (ConditionType.CONFIG_VALID, error is None, "Valid" if error is None else "Invalid")
        for cond in self.conditions.update(_CONFIG, [(*value, error or "")], time.time()):
            self._events.publish("condition_changed", model=None, condition=cond.to_json())

    def servable(self, desired: DesiredState) -> list[str]:
        """The names a request may use now: models loaded and ready, and those on disk that a
        request would load, unless they never can (quarantined, or too big for the budget or
        beside the pins): clients that list models offer these to people."""
        return [entry.name for entry in self.listed(desired)]

    def listed(self, desired: DesiredState) -> list[Listed]:
        """The servable names (see servable), with what a model list shows of each."""
        engines = self._registry.snapshot()
        disk = self._observer.disk
        observed = self.observed
        if observed is not None:
            budget = desired.memory.budget_bytes(observed.total_memory_bytes)
            pins = pinned_bytes(desired, observed)
        names: list[Listed] = []
        for mid, spec in desired.models.items():
            eng = engines.get(mid)
            ready = eng is not None and eng.state is EngineState.READY and not eng.draining
            on_demand = spec.want is not Want.ABSENT and mid in disk and disk[mid].downloaded
            if spec.want is Want.DOWNLOADED and not desired.jit:
                on_demand = False
            fail = self._failures.current(mid, spec)
            if on_demand and fail is not None and fail.quarantined:
                on_demand = False
            if on_demand and observed is not None:
                on_demand = never_fits(spec, observed.model(mid), budget, pins) is None
            if not (ready or on_demand):
                continue
            state = "loaded" if ready else "not-loaded"
            if mid in self._executor.loading and not ready:  # ready: its load is all but done
                state = "loading"
            context = eng.context_length if ready and eng else spec.engine.context_length
            path = self._store.locate(spec.source, spec.revision)
            names += [
                Listed(name, mid, spec.source, path, state, context)
                for name in (mid, *spec.aliases)
            ]
        return names

    def status(self, head: Head) -> dict[str, Any]:
        observed, plan = self.observed, self.plan
        sample = self._observer.sample
        live = self._registry.snapshot()
        models = {}
        for mid in {*head.desired.models, *(observed.models if observed else {})}:
            models[mid] = self._model_status(mid, head.desired, observed, live.get(mid))
        budget = head.desired.memory.budget_bytes(sample.total_bytes) if sample else None
        return {
            "generation": head.generation,
            "observedGeneration": head.observed_generation,
            "config": config_json(head.config_path, head.config_error, head.generation),
            "conditions": [c.to_json() for c in self.conditions.get(_CONFIG).values()],
            "memory": {
                "budget_bytes": budget,
                # What the models loaded or loading are charged now; the plan's `used_bytes` also
                # counts the room kept for loads waiting for it (a drain, their turn).
                "charged_bytes": sum(
                    o.charge_bytes for o in observed.models.values() if o.resident or o.loading
                )
                if observed
                else None,
                "unreleased_bytes": self._executor.releases.unreleased_bytes,
                "total_bytes": sample.total_bytes if sample else None,
                "available_bytes": sample.available_bytes if sample else None,
                "process_rss_bytes": sample.rss_bytes if sample else None,
                "mlx_active_bytes": sample.mlx_active_bytes if sample else None,
                "mlx_cache_bytes": sample.mlx_cache_bytes if sample else None,
            },
            "models": dict(sorted(models.items())),
            "plan": plan_json(plan) if plan else None,
            "last_pass": head.last_pass,
        }

    def _conditions_now(self, mid: str, job: Job | None) -> list[dict[str, Any]]:
        """The model's conditions as of the last pass, a download's progress and a load under
        way as of now: the pass that starts a load waits for it (up to load_timeout_s), and
        until it ended the model read "loads on request", and a resumed download 0%."""
        out = [c.to_json() for c in self.conditions.get(mid).values()]
        loading = mid in self._executor.loading and self._registry.get(mid) is None
        for c in out:
            if job is not None and c["type"] == ConditionType.DOWNLOADED and not c["status"]:
                c["message"] = job.describe()
            kind = c["type"] in (ConditionType.RESIDENT, ConditionType.READY)
            if loading and kind and not c["status"] and c["reason"] != "Loading":
                c["reason"], c["message"] = "Loading", ""
        return out

    def _waiting(self, mid: str) -> int:
        """The model's sequences past its batch's places, waiting for one (0 if not loaded)."""
        engine = self._registry.get(mid)
        return engine.stats().queued if engine is not None else 0

    def _sampling(
        self, mid: str, spec: ModelSpec | None, facts: DiskFacts | None
    ) -> dict[str, float] | None:
        """What a request that leaves sampling fields out gets for them, beyond OpenAI's
        defaults: its spec's, over its files' (as the engine read them, else as they are on
        disk; None where the files are not)."""
        engine = self._registry.get(mid)
        files = engine.sampling_defaults if engine is not None else None
        if files is None and facts is not None:
            files = facts.sampling
        if spec is None or files is None:
            return None
        return spec.sampling.over(files).model_dump(exclude_none=True)

    def _model_status(
        self,
        mid: str,
        desired: DesiredState,
        observed: ObservedState | None,
        live: ResidentModel | None,
    ) -> dict[str, Any]:
        """The model's conditions as of the last pass; what its engine is doing (requests in
        flight, sequences waiting for a place in its batch, bytes, process, last use) as of now,
        from `live`, where it is loaded."""
        spec = desired.models.get(mid)
        o = observed.models.get(mid) if observed else None
        o = o or ObservedModel(mid)
        if live is not None:
            o = replace(
                o,
                resident=True,
                resident_bytes=live.resident_bytes,
                in_flight=live.in_flight,
                pid=live.pid,
                last_used_s=live.last_used_s,
                request_ttl_s=live.ttl_s,
            )
        facts = self._observer.disk.get(mid)
        fp = facts.footprint if facts else None
        est = facts.estimate if facts else None
        rec = self._executor.loaded.get(mid)
        job = self._executor.fetcher.jobs.get(mid)
        fail = self._failures.current(mid, spec)
        age = self._clock() - o.last_used_s if o.resident else None
        return {
            "want": str(spec.want) if spec else None,
            "source": spec.source if spec else None,
            "revision": spec.revision if spec else None,
            # A Hub model's resolved commit: of its files on disk, else of its download under way.
            "commit": (facts.commit if facts else None) or (job.commit if job else None),
            "conditions": self._conditions_now(mid, job),
            "footprint": {
                "estimated_bytes": est.total_bytes if est else None,
                "measured_bytes": fp.total_bytes if fp is not None and fp.measured else None,
                "weights_bytes": fp.weights_bytes if fp else None,
                "kv_bytes": fp.kv_bytes if fp else None,
                "prompt_cache_bytes": fp.prompt_cache_bytes if fp else None,
                "process_bytes": fp.process_bytes if fp else None,
                "context_tokens": fp.context_tokens if fp else None,
                "load_rise_bytes": rec.usage.bytes if rec else None,
            },
            "resident_bytes": o.resident_bytes,
            "in_flight": o.in_flight,
            "waiting": self._waiting(mid),
            # How long it may sit idle before it is unloaded: its spec's, or its request's.
            "idle_ttl_s": idle_ttl_s(spec, o) if spec is not None and o.resident else None,
            "sampling": self._sampling(mid, spec, facts),
            "pid": o.pid,
            "last_used": None if age is None else _iso(time.time() - age),
            "failures": fail.count if fail else 0,
            "notes": _notes(spec, fp),
        }


def _notes(spec: ModelSpec | None, fp: Footprint | None) -> list[str]:
    """What the model does otherwise than its spec says, and why (no error: it serves)."""
    declared = spec.engine.context_length if spec else None
    if declared and fp and fp.context_tokens and fp.context_tokens < declared:
        return [
            f"engine.context_length {declared} is more than the model's own "
            f"{fp.context_tokens} tokens (its config.json): it serves {fp.context_tokens}"
        ]
    return []
