"""The reconcile loop: one asyncio task that observes, plans and executes until nothing is left.

`Reconciler` is the daemon's owner of the desired state and of every decision to download, load,
evict or unload. Triggers (config edits, the resync timer, requests for a model, finished work,
admin patches) only wake it. Requests that need a model loaded are decided inside the loop, never
by a read outside it. Lifecycle: `start()`, the loop (`_main_loop`), `stop()`.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import structlog

from lmx.errors import ConfigError, TemporaryError
from lmx.reconciler import manifest
from lmx.reconciler.actions import (
    BlockReason,
    Download,
    Load,
    Plan,
    Unload,
    UnloadReason,
    plan_json,
)
from lmx.reconciler.admission import pins_over_budget
from lmx.reconciler.events import EventBus, Subscription
from lmx.reconciler.executor import WAITING_FOR_LOAD, Executor
from lmx.reconciler.failures import FailureBook
from lmx.reconciler.journal import Journal, Quarantine, Recovery
from lmx.reconciler.observed import ObservedState
from lmx.reconciler.observing import Observer
from lmx.reconciler.outcomes import Outcome, Result
from lmx.reconciler.planning import plan
from lmx.reconciler.requests import Requests
from lmx.reconciler.settings import ReconcilerSettings
from lmx.reconciler.spec import DesiredState, ModelSpec, Want
from lmx.reconciler.status import Head, Listed, StatusView, config_json
from lmx.reconciler.triggers import Triggers
from lmx.runtime.engine import EngineState
from lmx.runtime.files import write_atomic
from lmx.runtime.memory import MemoryProbe
from lmx.runtime.registry import EngineRegistry
from lmx.runtime.sampling import SamplingDefaults
from lmx.runtime.store import ModelStore

log = structlog.get_logger(__name__)

# Wake reasons that a fresh observation answers; requests, edits and patches need a new pass.
_COVERED = frozenset({"engine_changed", "action_finished", "requeue", "resync", "start"})
_RETRY_UNCONVERGED_S = 0.5


class Reconciler:
    """Converges the engines and the disk to the desired state.

    Construct with the registry, store and memory probe the daemon uses (fakes at the engine
    boundary in tests). `config_path=None` runs without a file (admin patches only). `clock` must
    be the registry's clock: idle times compare its `last_used_s` with the loop's now.
    """

    def __init__(
        self,
        settings: ReconcilerSettings,
        *,
        registry: EngineRegistry,
        store: ModelStore,
        memory: MemoryProbe,
        config_path: Path | None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self.config_path = config_path
        self.events = EventBus(maxsize=settings.event_queue_size)
        self._registry = registry
        self._store = store
        self._memory = memory
        self._clock = clock
        self._journal = Journal(settings.journal_path)
        self._failures = FailureBook(
            max_failures=settings.max_failures,
            base_delay_s=settings.backoff_base_s,
            max_delay_s=settings.backoff_max_s,
        )
        self._executor = Executor(
            settings,
            registry=registry,
            store=store,
            memory=memory,
            journal=self._journal,
            events=self.events,
            clock=clock,
            on_finished=lambda: self.wake("action_finished"),
        )
        self._observer = Observer(
            registry=registry,
            store=store,
            memory=memory,
            executor=self._executor,
            failures=self._failures,
            clock=clock,
        )
        self._requests = Requests()
        self._triggers = Triggers(settings, config_path=config_path, wake=self.wake)
        self._desired = DesiredState()
        self._generation = 0
        self._observed_generation = 0
        self._config_error: str | None = None
        self._last_good: str | None = None  # the text in settings.last_good_path, once read
        self._accept_lock = asyncio.Lock()
        self._wake = asyncio.Event()
        self._reasons: set[str] = set()
        self._idled: dict[str, ModelSpec] = {}
        self._crashes: dict[str, tuple[ModelSpec, int, float]] = {}  # spec, in a row, last at
        self._recovery: Recovery | None = None  # until the first desired state is accepted
        self._requeue_after_s: float | None = None
        self._last_pass: dict[str, Any] = {}
        self._pass_ids = itertools.count(1)
        self._task: asyncio.Task[None] | None = None
        self._view = StatusView(
            registry=registry,
            store=store,
            executor=self._executor,
            observer=self._observer,
            failures=self._failures,
            events=self.events,
            clock=clock,
        )

    # -- public state --

    @property
    def desired(self) -> DesiredState:
        """The last good desired state."""
        return self._desired

    @property
    def generation(self) -> int:
        return self._generation

    @property
    def observed_generation(self) -> int:
        return self._observed_generation

    @property
    def config_error(self) -> str | None:
        return self._config_error

    # -- lifecycle --

    async def start(self) -> None:
        """Read the config file (writing nothing), recover the journal, finish the deletes a
        crash cut short, start the loop and its triggers. Returns once the first pass is under
        way; an invalid file is reported, not raised (`config_error`), and the daemon serves an
        empty desired state until it is fixed. The journal's quarantines apply to the first
        desired state accepted (see `_restore`)."""
        self._recovery = recovery = self._journal.recover()
        await asyncio.to_thread(self._store.finish_deletes)
        if self.config_path is not None:
            await self._reload_config()
            if self._config_error is not None:
                await self._accept_last_good()
        for mid in recovery.downloads:
            log.info("download_resuming", model=mid)
        self._registry.on_change = lambda: self.wake("engine_changed")
        self._registry.on_engine_failed = self._engine_failed
        self._task = asyncio.create_task(self._main_loop(), name="lmx-reconcile")
        self.wake("start")
        await self._triggers.start()

    async def stop(self) -> None:
        """Stop watching, cancel the loop, stop downloads and unload every engine."""
        await self._triggers.stop()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        self._requests.fail_all(TemporaryError("lmx is shutting down", delay_s=5.0))
        await self._executor.shutdown()
        self._registry.on_change = lambda: None

    def wake(self, reason: str) -> None:
        """Ask for a pass soon. Non-blocking; callable from the event loop thread only."""
        self._reasons.add(reason)
        self._wake.set()

    # -- the API's entry points --

    async def ensure_ready(self, name: str) -> str:
        """The model id for `name` (an id or an alias), once it is loaded and ready.

        Returns at once for a ready model. Otherwise the loop decides: load it (a `downloaded`
        model with jit on, or a resident one that idled out), or raise ModelNotFound (unknown or
        absent), TemporaryError (downloading, backing off, not ready within ready_timeout_s) or
        PermanentError (quarantined, too big for the budget, jit off).
        """
        mid = self._desired.resolve(name)
        if mid is not None and self._desired.models[mid].want is not Want.ABSENT:
            slot = self._registry.snapshot().get(mid)
            if slot is not None and slot.state is EngineState.READY and not slot.draining:
                return mid
        fut = self._requests.submit(name)
        self.wake("request")
        try:
            async with asyncio.timeout(self.settings.ready_timeout_s):
                return await fut
        except TimeoutError:
            waited = self.settings.ready_timeout_s
            raise TemporaryError(f"model {name!r} not ready after {waited:g}s", delay_s=5) from None

    def sampling(self, model_id: str) -> SamplingDefaults:
        """The sampling defaults `model_id`'s spec sets (none for a model no longer declared)."""
        spec = self._desired.models.get(model_id)
        return spec.sampling if spec is not None else SamplingDefaults()

    def servable(self) -> list[str]:
        """Ids and aliases a request may name now: ready, or loadable on demand."""
        return self._view.servable(self._desired)

    def listed(self) -> list[Listed]:
        """The servable names, with what a model list shows of each."""
        return self._view.listed(self._desired)

    async def check(self, new: DesiredState, *, origin: str = "the desired state") -> None:
        """Raise ConfigError if the pinned models of `new` alone exceed its memory budget (by
        what is known of their footprints now). Accepts nothing."""
        total = self._memory.sample().total_bytes
        footprints = await asyncio.to_thread(self._view.pin_footprints, new)
        if problems := pins_over_budget(new, footprints, total):
            raise ConfigError(origin, problems)

    async def apply_desired(self, new: DesiredState) -> None:
        """Accept a new desired state (admin PATCH). Raises ConfigError if its pins alone exceed
        the budget; otherwise bumps `generation` and wakes the loop. Writes no file: the caller
        has written `new` to the config file, so the file is valid now and an error reported
        for what it held before is cleared (the answer to a PATCH that fixes it says so)."""
        await self._accept(new, origin="admin")
        if self._config_error is not None:
            self._config_error = None
            self._view.update_config(None)

    def config_json(self) -> dict[str, Any]:
        path = str(self.config_path) if self.config_path else None
        return config_json(path, self._config_error, self._generation)

    def status(self) -> dict[str, Any]:
        """A JSON-able document: generations, config validity, memory, per-model conditions."""
        head = Head(
            desired=self._desired,
            generation=self._generation,
            observed_generation=self._observed_generation,
            config_path=str(self.config_path) if self.config_path else None,
            config_error=self._config_error,
            last_pass=self._last_pass,
        )
        return self._view.status(head)

    def plan_now(self) -> Plan:
        """What the loop would do now, from its last observation."""
        observed = self._view.observed or ObservedState(0.0, self._memory.sample().total_bytes)
        return plan(self._desired, observed)

    def plan_now_json(self) -> dict[str, Any]:
        """The plan now, and the loads and downloads under way (which it holds, not repeats)."""
        observed = self._view.observed
        under_way = [
            {"action": "Load" if o.loading else "Download", "model": mid}
            for mid, o in (observed.models.items() if observed else ())
            if o.loading or o.downloading
        ]
        return {**plan_json(self.plan_now()), "under_way": under_way}

    async def dry_run(self, new: DesiredState) -> Plan:
        """The plan a desired state would get now (observed afresh), without accepting it."""
        observed = await self._observe(new, record=False)
        return plan(new, observed)

    def subscribe(self, after: int | None = None) -> Subscription:
        """Events: `action`, `condition_changed`, `download_progress`, `desired_changed`, ...;
        with `after`, first those kept since that `seq` (see EventBus.subscribe)."""
        return self.events.subscribe(after)

    # -- accepting a desired state --

    async def _reload_config(self) -> None:
        """Read the file; accept it or keep the last good state. Runs inside the loop (or before
        it starts), so accepting needs no wake."""
        path = self.config_path
        assert path is not None

        def read() -> tuple[str, DesiredState]:
            text = manifest.read_text(path)
            return text, manifest.parse(text, source=str(path))

        try:
            text, new = await asyncio.to_thread(read)
            try:
                await self._accept(new, origin=str(path), wake=False)
            except ConfigError as exc:  # the budget check: its errors get the file's lines
                raise ConfigError(exc.source, manifest.locate(exc.errors, text)) from None
        except ConfigError as exc:
            self._config_error = str(exc)
            log.error("config_invalid", path=str(self.config_path), errors=exc.errors)
            self.events.publish("config_invalid", path=str(self.config_path), errors=exc.errors)
        else:
            self._config_error = None
            await asyncio.to_thread(self._keep_last_good, text)
        self._view.update_config(self._config_error)

    def _keep_last_good(self, text: str) -> None:
        """Copy the file as accepted, for a start that finds it invalid (a typo, then a crash)."""
        path = self.settings.last_good_path
        if self._last_good is None:
            with contextlib.suppress(OSError):
                self._last_good = path.read_text(encoding="utf-8")
        if text == self._last_good:
            return
        try:
            write_atomic(path, text, mode=0o600)  # it may hold API keys
        except OSError as exc:  # the next accepted edit tries again
            log.warning("last_good_not_kept", path=str(path), error=str(exc))
        else:
            self._last_good = text

    async def _accept_last_good(self) -> None:
        """At a start that found the file invalid: serve the state last accepted from it, as the
        daemon that accepted it did, until the file is fixed. None kept: nothing is served."""
        path = self.settings.last_good_path

        def read() -> DesiredState:
            return manifest.parse(manifest.read_text(path), source=str(path))

        if not path.is_file():
            return
        try:
            await self._accept(await asyncio.to_thread(read), origin=str(path), wake=False)
        except ConfigError as exc:
            log.error("last_good_invalid", path=str(path), errors=exc.errors)
        else:
            log.warning("serving_last_good_state", path=str(path))

    async def _accept(self, new: DesiredState, *, origin: str, wake: bool = True) -> None:
        async with self._accept_lock:
            if new == self._desired and self._generation:
                # No edit, nothing to refuse: pins that outgrew the budget since they were
                # accepted (a local model rebuilt bigger) are the planner's to hold back.
                return
            await self.check(new, origin=origin)
            self._desired = new
            self._generation += 1
            if self._recovery is not None:
                self._restore(self._recovery, new)
            log.info("desired_accepted", origin=origin, generation=self._generation)
            self.events.publish("desired_changed", origin=origin, generation=self._generation)
            if wake:
                self.wake("desired_changed")

    # -- the loop --

    async def _main_loop(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._requeue_after_s):
                    await self._wake.wait()
            self._wake.clear()
            reasons, self._reasons = self._reasons or {"requeue"}, set()
            try:
                await self._pass(reasons)
            except Exception:
                # The supervisor's catch: a bug in one pass must not stop the daemon converging.
                log.exception("reconcile_pass_crashed")
                await asyncio.sleep(1.0)

    async def _pass(self, reasons: set[str]) -> None:
        """One pass: take in edits and requests, converge, then report and answer requests."""
        rid = next(self._pass_ids)
        started = time.monotonic()
        with structlog.contextvars.bound_contextvars(reconcile_id=rid):
            # The resync re-reads the file too: it heals an edit the watcher missed.
            if reasons & {"config_changed", "resync"} and self.config_path is not None:
                await self._reload_config()
            generation, desired = self._generation, self._desired
            self._requests.admit(desired, self.servable)
            self._failures.forget_undeclared(set(desired.models))
            for mid in [m for m, spec in self._idled.items() if desired.models.get(m) != spec]:
                del self._idled[mid]
            for mid in [m for m, c in self._crashes.items() if desired.models.get(m) != c[0]]:
                del self._crashes[mid]
            if back := await self._executor.releases.recheck():
                self.events.publish("memory_released", models=back)
            observed, current, executed = await self._converge(desired)
            # Loads waiting for the one under way: its end wakes the loop.
            executed = [o for o in executed if o.reason != WAITING_FOR_LOAD]
            soon = [
                current.requeue_after_s,
                self.settings.release_recheck_s if self._executor.releases.leaks else None,
                _RETRY_UNCONVERGED_S if not current.is_empty and executed else None,
            ]
            self._requeue_after_s = min((t for t in soon if t is not None), default=None)
            self._view.update_conditions(desired, observed, current)
            answered = self._requests.resolve(desired, observed, current, self._failures)
            if answered and any(b.reason is BlockReason.WAITING_FOR_TURN for b in current.blocked):
                # A model whose request was answered may be evicted now: plan the others again.
                self.wake("request_answered")
            self._keep_quarantines()
            self._observed_generation = generation
            took = time.monotonic() - started
            self._last_pass = {"id": rid, "reasons": sorted(reasons), "duration_s": took}
            (log.info if executed else log.debug)(
                "reconcile_pass",
                reasons=sorted(reasons),
                actions=len(executed),
                blocked=len(current.blocked),
                duration_s=round(took, 4),
            )

    async def _converge(self, desired: DesiredState) -> tuple[ObservedState, Plan, list[Outcome]]:
        """Observe, plan, execute, until the plan is empty, nothing progresses, or the step limit
        is reached (then wake again: triggers that came meanwhile get their turn)."""
        executed: list[Outcome] = []
        for step in range(self.settings.max_steps_per_pass + 1):
            observed = await self._step_observe(desired)
            current = plan(desired, observed)
            if current.is_empty:
                break
            if step == self.settings.max_steps_per_pass:
                # Plans converge in one step or two; more means something does not hold still.
                # Yield to other triggers, and come back soon rather than spin.
                log.warning("reconcile_not_converged", steps=step, actions=len(current.actions))
                break
            outcomes = await self._executor.execute(current, desired)
            executed += outcomes
            self._apply(outcomes, desired)
            if not any(o.result is Result.DONE for o in outcomes):
                observed = await self._step_observe(desired)
                current = plan(desired, observed)
                break
        return observed, current, executed

    async def _step_observe(self, desired: DesiredState) -> ObservedState:
        """Fold in finished background work, then observe. Wakes that this observation covers
        (engine changes, finished work, timers) are dropped: they would only repeat it."""
        self._apply(self._executor.take_finished(), desired)
        self._reasons -= _COVERED
        if not self._reasons:
            self._wake.clear()
        return await self._observe(desired)

    def _restore(self, recovery: Recovery, desired: DesiredState) -> None:
        """Take over what the previous process left, at the first desired state accepted (the
        file at start, or once it is fixed): a model it quarantined stays quarantined while its
        entry is the one it failed under, and a model whose load killed the process twice is
        quarantined. A quarantine is lifted the same ways whether lmx was down or running: by
        any change of the model's entry (e.g. `lmx set MODEL ...`), or by removing the model."""
        self._recovery = None
        for mid, spec in desired.models.items():
            held = recovery.quarantined.get(mid)
            if held is not None:  # its entry edited since: lifted, its load deaths forgotten
                if held.spec_digest == spec.digest():
                    self._failures.quarantine(mid, spec, held.reason, held.message)
                    log.error("model_quarantined", model=mid, reason=held.reason, restored=True)
            elif n := recovery.crash_quarantined(mid, spec.load_digest()):
                msg = f"loading it ended the process {n} times; change its spec to retry"
                self._failures.quarantine(mid, spec, "LoadCrashedProcess", msg)
                log.error("model_quarantined", model=mid, reason="LoadCrashedProcess", deaths=n)
        self._keep_quarantines()

    def _keep_quarantines(self) -> None:
        """Record the models quarantined now in the journal, so that a restart keeps them out of
        service; one no longer quarantined (its spec changed, or it is gone) leaves the journal.
        Not before the previous process's are taken over (`_restore`)."""
        if self._recovery is not None:
            return
        now = {}
        for mid, spec in self._desired.models.items():
            rec = self._failures.current(mid, spec)
            if rec is not None and rec.quarantined:
                now[mid] = Quarantine(spec.digest(), rec.reason, rec.message)
        self._journal.set_quarantined(now)

    def _engine_failed(self, model_id: str, reason: str, served: bool) -> None:
        """A loaded model's engine died on its own (its worker crashed). It is loaded again after
        a backoff that doubles with each crash in a row, and quarantined after `max_failures` in
        a row: a model that crashes on every request must not be reloaded after every crash. An
        engine that `served` a request before it crashed, or a crash `crash_window_s` after the
        last, starts the count over: a model that serves between rare crashes is not one that
        cannot run, and a few bad requests must not take it out of service."""
        spec = self._desired.models.get(model_id)
        if spec is None:
            return
        now = self._clock()
        prev = self._crashes.get(model_id)
        in_a_row = 1
        recent = prev is not None and now - prev[2] < self.settings.crash_window_s
        if prev is not None and prev[0] == spec and recent and not served:
            in_a_row = prev[1] + 1
        self._crashes[model_id] = (spec, in_a_row, now)
        s = self.settings
        rec = self._failures.failed(
            model_id,
            spec,
            "EngineCrashed",
            f"{reason} (crash {in_a_row} in a row)",
            now_s=now,
            delay_s=min(s.backoff_max_s, s.backoff_base_s * 2 ** (in_a_row - 1)),
            permanent=in_a_row >= s.max_failures,
            in_a_row=in_a_row,
        )
        self.events.publish("engine_failed", model=model_id, reason=reason, in_a_row=in_a_row)
        if rec.quarantined:
            log.error("model_quarantined", model=model_id, reason="EngineCrashed", crashes=in_a_row)
            self._keep_quarantines()  # now: a restart before the next pass must not reload it

    async def _observe(self, desired: DesiredState, *, record: bool = True) -> ObservedState:
        return await self._observer.observe(
            desired, requested=self._requests.wanted(), idled=self._idled, record=record
        )

    def _apply(self, outcomes: list[Outcome], desired: DesiredState) -> None:
        """Fold outcomes into the failure records and the idle marks; publish each."""
        now = self._clock()
        for o in outcomes:
            self.events.publish("action", **o.to_json())
            mid, spec = o.model_id, desired.models.get(o.model_id)
            if spec is None:
                continue
            match o.action:
                case Load() | Download() if o.result is Result.DONE:
                    self._failures.succeeded(mid, now_s=now)
                    self._idled.pop(mid, None)
                case Load() | Download() if o.failed:
                    rec = self._failures.failed(
                        mid,
                        spec,
                        o.reason,
                        o.message,
                        now_s=now,
                        delay_s=o.delay_s,
                        permanent=o.permanent,
                    )
                    if rec.quarantined:
                        log.error("model_quarantined", model=mid, reason=o.reason, error=o.message)
                case Unload(reason=UnloadReason.IDLE_TIMEOUT) if o.result is Result.DONE:
                    self._idled[mid] = spec
                case _:
                    pass
