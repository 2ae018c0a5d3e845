"""The executor: performs a plan's actions in order, each returning an `Outcome`; never raises
except on cancellation.

Called by the reconcile loop only. It owns what the side effects leave behind: the record of
each engine it loaded (spec, measured usage), the loads in progress, the drains (deadline and
reason), memory an unload has not yet returned, and the download jobs (`fetching.py`). Loads run
one at a time.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import assert_never

import structlog

from lmx.reconciler.actions import (
    Action,
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
)
from lmx.reconciler.events import EventBus
from lmx.reconciler.fetching import Fetcher, sizing_of
from lmx.reconciler.journal import Intent, Journal, JournalUnwritable
from lmx.reconciler.outcomes import Outcome, Result, failure
from lmx.reconciler.releasing import Releases
from lmx.reconciler.settings import ReconcilerSettings
from lmx.reconciler.spec import DesiredState, ModelSpec, Want
from lmx.runtime.engine import LoadConfig
from lmx.runtime.memory import MemoryProbe, Usage, rise
from lmx.runtime.registry import EngineRegistry
from lmx.runtime.store import ModelStore

log = structlog.get_logger(__name__)

# How long a pass waits for a load it began: a longer one goes on in the background (see _load).
_LOAD_WAIT_S = 2.0
# A load's reason to wait for the one under way: its end wakes the loop, nothing to retry sooner.
WAITING_FOR_LOAD = "WaitingForLoad"


@dataclass(frozen=True)
class LoadRecord:
    """What the executor knows of an engine it loaded."""

    spec: ModelSpec
    want: Want  # why it was loaded: its spec's want, or DOWNLOADED for a load on request
    usage: Usage  # what the load took, by each memory signal


def load_config(model_id: str, spec: ModelSpec, store: ModelStore) -> LoadConfig:
    e = spec.engine
    return LoadConfig(
        model_id=model_id,
        path=store.locate(spec.source, spec.revision),
        max_batch=e.max_batch,
        context_length=e.context_length,
        max_queue=e.max_queue,
        prefill_step=e.prefill_step,
        prompt_cache_bytes=e.prompt_cache_bytes,
        tool_parser=e.tool_parser,
        reasoning_parser=e.reasoning_parser,
    )


class Executor:
    def __init__(
        self,
        settings: ReconcilerSettings,
        *,
        registry: EngineRegistry,
        store: ModelStore,
        memory: MemoryProbe,
        journal: Journal,
        events: EventBus,
        clock: Callable[[], float],
        on_finished: Callable[[], None],
    ) -> None:
        self._s = settings
        self._registry = registry
        self._store = store
        self._memory = memory
        self._journal = journal
        self._clock = clock
        self._on_finished = on_finished
        self.loaded: dict[str, LoadRecord] = {}
        self.loading: dict[str, asyncio.Task[Outcome]] = {}
        # Models draining: when their drain began to end (the deadline), and why it began.
        self.drains: dict[str, tuple[float, UnloadReason]] = {}
        self.releases = Releases(settings, memory=memory, registry=registry, clock=clock)
        self.fetcher = Fetcher(store=store, journal=journal, events=events, on_done=self._finish)
        self._finished: list[Outcome] = []
        self._background: set[str] = set()  # loads that went on past the pass that began them
        self._timed_out: set[str] = set()  # ... and past load_timeout_s (reported LoadTimeout)
        self._watches: set[asyncio.Task[None]] = set()

    # -- the loop's interface --

    def take_finished(self) -> list[Outcome]:
        """Outcomes of work that ended in the background (downloads, loads past their timeout)."""
        out, self._finished = self._finished, []
        return out

    async def execute(self, plan: Plan, desired: DesiredState) -> list[Outcome]:
        outcomes = []
        self.releases.blocking = False
        for action in plan.actions:
            if isinstance(action, Load) and self.releases.blocking:
                msg = "an earlier unload's memory has not come back"
                outcomes.append(Outcome(action, Result.SKIPPED, "MemoryNotReleased", msg))
                continue
            started = time.monotonic()
            try:
                outcome = await self._perform(action, desired, plan.budget_bytes)
            except Exception as exc:  # one of the three broad catches: an action's failure
                outcome = failure(action, exc, duration_s=time.monotonic() - started)
            waits = outcome.reason == WAITING_FOR_LOAD  # again at each pass while it loads
            (log.debug if waits else log.info)("action_done", **outcome.to_json())
            outcomes.append(outcome)
        return outcomes

    async def shutdown(self) -> None:
        """Stop downloads (they resume at the next start), let loads finish (bounded), and unload
        every engine."""
        await self.fetcher.shutdown(self._s.unload_timeout_s)
        if self.loading:
            await asyncio.wait(list(self.loading.values()), timeout=self._s.unload_timeout_s)
        for watch in list(self._watches):
            watch.cancel()
        for mid in self._registry.ids():
            self._registry.drain(mid)
            try:
                await asyncio.wait_for(self._registry.unload(mid), self._s.unload_timeout_s)
            except Exception as exc:  # the unload action's catch, at shutdown: report, go on
                log.warning("unload_failed_at_shutdown", model=mid, error=str(exc))
        for mid in list(self.loading):
            self._journal.end(Intent.LOAD, mid, ok=False)  # cut by shutdown, not a crash

    # -- actions --

    async def _perform(self, action: Action, desired: DesiredState, budget_bytes: int) -> Outcome:
        match action:
            case Resume(model_id=mid):
                self._registry.drain(mid, False)
                self.drains.pop(mid, None)
                return Outcome(action, Result.DONE)
            case Drain(model_id=mid, reason=reason):
                self._drain(mid, reason)
                return Outcome(action, Result.DONE)
            case Unload(model_id=mid, forced=forced):
                return await self._unload(action, mid, forced)
            case Evict(model_id=mid):
                return await self._unload(action, mid, False)
            case CancelDownload(model_id=mid):
                found = self.fetcher.cancel(mid)
                return Outcome(action, Result.DONE if found else Result.DEFERRED)
            case Delete(model_id=mid):
                spec = desired.models[mid]
                await self.fetcher.stopped(mid, self._s.unload_timeout_s)
                self._journal.begin(Intent.DELETE, mid, spec.load_digest())
                freed = await asyncio.to_thread(self._store.delete, spec.source, spec.revision)
                self._journal.end(Intent.DELETE, mid, ok=True)
                return Outcome(action, Result.DONE, message=f"{freed} bytes freed")
            case Download(model_id=mid):
                spec = desired.models[mid]
                concurrency = desired.downloads.concurrency
                return self.fetcher.start(
                    action, spec, budget_bytes=budget_bytes, concurrency=concurrency
                )
            case Load(model_id=mid):
                return await self._load(action, desired.models[mid])
            case _:
                assert_never(action)

    def _drain(self, mid: str, reason: UnloadReason) -> None:
        """Stop admitting requests to `mid`, its first drain's deadline and reason kept."""
        self._registry.drain(mid)
        self.drains.setdefault(mid, (self._clock() + self._s.drain_timeout_s, reason))

    async def _unload(self, action: Unload | Evict, mid: str, forced: bool) -> Outcome:
        slot = self._registry.snapshot().get(mid)
        if slot is None:
            return Outcome(action, Result.DONE, "NotLoaded")
        # Check and unload with no await between: a request cannot slip in after the check.
        if slot.in_flight > 0 and not forced:
            self._drain(mid, action.reason if isinstance(action, Unload) else UnloadReason.EVICTED)
            return Outcome(action, Result.DEFERRED, "Busy", f"{slot.in_flight} in flight")
        record = self.loaded.pop(mid, None)
        expected = record.usage if record else Usage(slot.resident_bytes, 0)
        before = self.releases.measure(exclude=mid)
        try:
            self._journal.begin(Intent.UNLOAD, mid, record.spec.load_digest() if record else "")
        except JournalUnwritable as exc:  # no start reads an unload's record: it goes on
            log.warning("unload_not_journaled", model=mid, error=str(exc))
        started = time.monotonic()
        self.drains.pop(mid, None)
        try:
            async with asyncio.timeout(self._s.unload_timeout_s):
                # Awaited in this task: the registry drops the slot before the first suspension.
                await self._registry.unload(mid)
        finally:
            self._journal.end(Intent.UNLOAD, mid, ok=True)
        short = await self.releases.verify(mid, before, expected)
        took = time.monotonic() - started
        if short:
            msg = f"{short} bytes not returned after {self._s.release_timeout_s}s"
            return Outcome(
                action, Result.DONE, "MemoryNotReleased", msg, took, unreleased_bytes=short
            )
        return Outcome(action, Result.DONE, duration_s=took)

    async def _load(self, action: Load, spec: ModelSpec) -> Outcome:
        """The load's outcome if it ends within _LOAD_WAIT_S; else it goes on in the background
        (STARTED), its outcome handed over when it ends, or LoadTimeout at load_timeout_s. The
        pass waited for it: a large model's load held every other edit up, and status too. One
        load runs at a time (each is measured alone), besides those past their timeout."""
        mid = action.model_id
        if mid in self.loading:
            return Outcome(action, Result.DEFERRED, "AlreadyLoading")
        if self._registry.get(mid) is not None:
            return Outcome(action, Result.DONE, "AlreadyLoaded")
        if running := [m for m in self.loading if m not in self._timed_out]:
            return Outcome(action, Result.DEFERRED, WAITING_FOR_LOAD, f"{running[0]} is loading")
        config = await asyncio.to_thread(load_config, mid, spec, self._store)
        task = asyncio.create_task(self._load_task(action, spec, config))
        self.loading[mid] = task
        wait_s = min(_LOAD_WAIT_S, self._s.load_timeout_s)
        done, _ = await asyncio.wait({task}, timeout=wait_s)
        if done:
            return task.result()
        self._background.add(mid)
        watch = asyncio.create_task(self._watch_load(action, task, self._s.load_timeout_s - wait_s))
        self._watches.add(watch)
        watch.add_done_callback(self._watches.discard)
        return Outcome(action, Result.STARTED, "Loading")

    async def _watch_load(self, action: Load, task: asyncio.Task[Outcome], left_s: float) -> None:
        """LoadTimeout for the load `task` still runs after `left_s` more seconds."""
        done, _ = await asyncio.wait({task}, timeout=left_s)
        if done:
            return
        self._timed_out.add(action.model_id)
        msg = f"still loading after {self._s.load_timeout_s:g}s"
        self._finish(Outcome(action, Result.FAILED, "LoadTimeout", msg, self._s.load_timeout_s))

    async def _load_task(self, action: Load, spec: ModelSpec, config: LoadConfig) -> Outcome:
        mid, digest, started = action.model_id, spec.load_digest(), time.monotonic()
        before = self.releases.measure(exclude=mid)
        try:
            self._journal.begin(Intent.LOAD, mid, digest)
            engine = await self._registry.load(config)
        except Exception as exc:  # the engine's load failed: an outcome, and the journal says so
            self._journal.end(Intent.LOAD, mid, ok=False)
            return self._loaded(failure(action, exc, duration_s=time.monotonic() - started))
        after = self.releases.measure(exclude=mid)
        usage = rise(before.sample, after.sample, others_growth=after.others - before.others)
        measured = max(usage.bytes, engine.resident_bytes())
        want = Want.DOWNLOADED if action.why is Want.DOWNLOADED else spec.want
        self.loaded[mid] = LoadRecord(spec, want, usage)
        self._journal.end(Intent.LOAD, mid, ok=True)
        try:
            await asyncio.to_thread(self._record_measured, mid, spec, measured)
        except OSError as exc:  # the next load measures it again; this one stands
            log.warning("footprint_not_recorded", model=mid, error=str(exc))
        took = time.monotonic() - started
        return self._loaded(Outcome(action, Result.DONE, duration_s=took, measured_bytes=measured))

    def _record_measured(self, mid: str, spec: ModelSpec, measured: int) -> None:
        """What the load took, with what its weights are estimated at: other weights under the
        same spec (a local model rebuilt) are not charged this."""
        digest = spec.load_digest()
        est = self._store.estimate(mid, digest, spec.source, spec.revision, sizing_of(spec))
        self._store.record_measured(mid, digest, measured, est.weights_bytes if est else None)

    def _loaded(self, outcome: Outcome) -> Outcome:
        mid = outcome.model_id
        self.loading.pop(mid, None)
        if mid in self._timed_out:  # reported as LoadTimeout: this one is late
            self._timed_out.discard(mid)
            self._background.discard(mid)
            self._finish(dataclasses.replace(outcome, late=True))
        elif mid in self._background:  # the pass went on: a later one takes the outcome in
            self._background.discard(mid)
            self._finish(outcome)
        return outcome

    def _finish(self, outcome: Outcome) -> None:
        """Hand over an outcome of work that ended after its pass: logged here as a pass logs
        its own (a download's end logs itself, as download_finished)."""
        if isinstance(outcome.action, Load):
            log.info("action_done", **outcome.to_json())
        self._finished.append(outcome)
        self._on_finished()
