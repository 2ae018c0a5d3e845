"""Download jobs: each Download action becomes a background task (downloads take minutes).

Owned by the executor. A job admits the model before fetching its weights (memory: a lower bound
from the Hub's file sizes before any byte, then the estimate with config.json's KV cache; disk:
what is left to fetch against free space), records its intent in the journal, reports progress
as events, and leaves its outcome for the reconcile loop, which it wakes. At most `concurrency`
jobs resolve or fetch at once, counting jobs started under an earlier concurrency.
"""

from __future__ import annotations

import asyncio
import functools
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import structlog

from lmx.reconciler.actions import Download
from lmx.reconciler.events import EventBus
from lmx.reconciler.journal import Intent, Journal, JournalUnwritable
from lmx.reconciler.outcomes import Outcome, Result, failure
from lmx.reconciler.spec import ModelSpec
from lmx.runtime.downloads import DownloadCancelled, ProgressEvent, RepoSnapshot
from lmx.runtime.store import Footprint, ModelStore, Sizing
from lmx.units import fmt_bytes

log = structlog.get_logger(__name__)


def sizing_of(spec: ModelSpec) -> Sizing:
    e = spec.engine
    return Sizing(e.context_length, e.max_batch, e.prompt_cache_bytes, e.prefill_step)


@dataclass
class Job:
    spec: ModelSpec
    cancel: threading.Event
    task: asyncio.Task[None] | None = None
    bytes_done: int = 0
    bytes_total: int = 0
    rate_bps: float = 0.0
    queued: bool = True
    commit: str | None = None  # what the revision resolved to

    def describe(self) -> str:
        if self.queued:
            return "queued"
        if not self.bytes_total:
            return "resolving"
        pct = 100 * self.bytes_done / self.bytes_total
        return f"{pct:.0f}% of {fmt_bytes(self.bytes_total)} at {fmt_bytes(int(self.rate_bps))}/s"


class Fetcher:
    def __init__(
        self,
        *,
        store: ModelStore,
        journal: Journal,
        events: EventBus,
        on_done: Callable[[Outcome], None],
    ) -> None:
        self._store = store
        self._journal = journal
        self._events = events
        self._on_done = on_done
        self.jobs: dict[str, Job] = {}
        self._concurrency = 1
        self._running = 0  # jobs holding a slot
        self._slot_freed = asyncio.Event()
        self.stopping = False

    def start(
        self, action: Download, spec: ModelSpec, *, budget_bytes: int, concurrency: int
    ) -> Outcome:
        mid = action.model_id
        if mid in self.jobs:
            return Outcome(action, Result.DEFERRED, reason="AlreadyDownloading")
        if concurrency != self._concurrency:
            self._concurrency = concurrency
            self._slot_freed.set()  # a raised limit may admit queued jobs now
        job = Job(spec, threading.Event())
        self.jobs[mid] = job
        job.task = asyncio.create_task(self._run(action, job, budget_bytes))
        return Outcome(action, Result.STARTED)

    def cancel(self, model_id: str) -> bool:
        """Ask a job to stop; False if there is none or it was asked already."""
        job = self.jobs.get(model_id)
        if job is None or job.cancel.is_set():
            return False
        job.cancel.set()
        self._slot_freed.set()  # a queued job stops waiting for a slot
        return True

    async def stopped(self, model_id: str, timeout_s: float) -> None:
        """Cancel this model's job, if any, and wait (bounded) until its thread lets go."""
        job = self.jobs.get(model_id)
        if job is not None and job.task is not None:
            self.cancel(model_id)
            await asyncio.wait({job.task}, timeout=timeout_s)

    async def shutdown(self, timeout_s: float) -> None:
        self.stopping = True
        tasks = [j.task for j in self.jobs.values() if j.task is not None]
        for job in self.jobs.values():
            job.cancel.set()
        self._slot_freed.set()
        if tasks:
            await asyncio.wait(tasks, timeout=timeout_s)

    async def _take_slot(self, job: Job) -> bool:
        """Wait for a slot under the current concurrency; False if the job was cancelled first."""
        while self._running >= self._concurrency and not job.cancel.is_set():
            self._slot_freed.clear()
            await self._slot_freed.wait()
        if job.cancel.is_set():
            return False
        self._running += 1
        return True

    def _free_slot(self) -> None:
        self._running -= 1
        self._slot_freed.set()

    async def _run(self, action: Download, job: Job, budget_bytes: int) -> None:
        mid = action.model_id
        outcome = Outcome(action, Result.DEFERRED, "Cancelled", "before it started")
        try:
            if await self._take_slot(job):
                try:
                    job.queued = False
                    try:
                        self._journal.begin(Intent.DOWNLOAD, mid, job.spec.load_digest())
                    except JournalUnwritable as exc:
                        outcome = failure(action, exc, duration_s=0.0)
                    else:
                        log.info("download_started", model=mid, source=job.spec.source)
                        outcome = await self._fetch(action, job, budget_bytes)
                        if not self.stopping:  # one cut by shutdown resumes at the next start
                            self._journal.end(Intent.DOWNLOAD, mid, ok=not outcome.failed)
                finally:
                    self._free_slot()
        finally:
            self.jobs.pop(mid, None)
        log.info("download_finished", model=mid, result=str(outcome.result), reason=outcome.reason)
        self._on_done(outcome)

    async def _fetch(self, action: Download, job: Job, budget_bytes: int) -> Outcome:
        mid, spec, started = action.model_id, job.spec, time.monotonic()
        loop = asyncio.get_running_loop()

        def progress(ev: ProgressEvent) -> None:  # on the download thread
            loop.call_soon_threadsafe(self._progress, mid, job, ev)

        try:
            snapshot = None
            if spec.is_hub:
                snapshot = await asyncio.to_thread(self._store.resolve, spec.source, spec.revision)
                job.bytes_total, job.commit = snapshot.total_bytes, snapshot.commit
                if (refused := await self._admit(action, job, snapshot, budget_bytes)) is not None:
                    return refused
            await asyncio.to_thread(
                self._store.fetch,
                spec.source,
                spec.revision,
                snapshot=snapshot,
                on_progress=progress,
                cancel=job.cancel,
            )
            return Outcome(action, Result.DONE, duration_s=time.monotonic() - started)
        except DownloadCancelled:
            return Outcome(action, Result.DEFERRED, "Cancelled", "partial files are kept")
        except Exception as exc:  # the executor's per-action catch: it becomes an outcome
            return failure(action, exc, duration_s=time.monotonic() - started)

    async def _admit(
        self, action: Download, job: Job, snapshot: RepoSnapshot, budget_bytes: int
    ) -> Outcome | None:
        """None if the model may be downloaded, else the outcome that turns it away. Memory by
        the weights alone first (no byte fetched), then disk (raises InsufficientDisk), then
        memory with the KV cache that config.json implies."""
        spec = job.spec
        estimate = functools.partial(
            self._store.estimate_remote, action.model_id, spec.load_digest(), snapshot,
            sizing_of(spec),
        )  # fmt: skip

        def too_big(fp: Footprint) -> Outcome | None:
            if fp.total_bytes <= budget_bytes:
                return None
            msg = f"needs {fmt_bytes(fp.total_bytes)}, the budget is {fmt_bytes(budget_bytes)}"
            return Outcome(action, Result.DEFERRED, "ExceedsBudget", msg)

        if refused := too_big(await asyncio.to_thread(estimate, fetch_config=False)):
            return refused
        await asyncio.to_thread(self._store.check_disk, snapshot)
        return too_big(await asyncio.to_thread(estimate, fetch_config=True))

    def _progress(self, mid: str, job: Job, ev: ProgressEvent) -> None:
        job.bytes_done, job.bytes_total, job.rate_bps = ev.bytes_done, ev.bytes_total, ev.rate_bps
        self._events.publish(
            "download_progress",
            model=mid,
            file=ev.file,
            bytes_done=ev.bytes_done,
            bytes_total=ev.bytes_total,
            rate_bps=round(ev.rate_bps),
            eta_s=ev.eta_s,
        )
