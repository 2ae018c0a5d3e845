"""Requests waiting for a model: submitted by `ensure_ready`, decided by the reconcile loop.

`submit` only queues; the loop `admit`s them at the start of a pass (unknown names fail there) and
`resolve`s them at its end from what it observed and planned: ready, a clear error, or keep
waiting. The loop is the only writer; a cancelled waiter (client gone) is simply dropped.
"""

from __future__ import annotations

import asyncio
import itertools
import re
from collections.abc import Callable

from lmx.errors import LmxError, ModelNotFound, PermanentError, TemporaryError
from lmx.reconciler.actions import TERMINAL_REASONS, BlockReason, Plan
from lmx.reconciler.failures import FailureBook
from lmx.reconciler.observed import ObservedState
from lmx.reconciler.spec import DesiredState, Want

_RETRY_S = 5.0


class Requests:
    def __init__(self) -> None:
        self._order = itertools.count(1)  # requests in the order they came
        self._inbox: list[tuple[str, int, asyncio.Future[str]]] = []
        self._waiting: dict[str, list[tuple[int, asyncio.Future[str]]]] = {}

    def submit(self, name: str) -> asyncio.Future[str]:
        fut: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._inbox.append((name, next(self._order), fut))
        return fut

    def admit(self, desired: DesiredState, servable: Callable[[], list[str]]) -> None:
        """Move queued requests to their model's waiters; fail unknown or absent names now."""
        inbox, self._inbox = self._inbox, []
        for name, order, fut in inbox:
            if fut.done():
                continue
            mid = desired.resolve(name)
            if mid is None or desired.models[mid].want is Want.ABSENT:
                fut.set_exception(ModelNotFound(name, servable()))
            else:
                self._waiting.setdefault(mid, []).append((order, fut))

    def wanted(self) -> dict[str, int]:
        """Models that a live request waits for, each with the place of the first such request
        in the order requests came (the planner loads them first come, first served)."""
        for mid in list(self._waiting):
            live = [(n, f) for n, f in self._waiting[mid] if not f.done()]
            if live:
                self._waiting[mid] = live
            else:
                del self._waiting[mid]
        return {mid: min(n for n, _ in waiters) for mid, waiters in self._waiting.items()}

    def resolve(
        self, desired: DesiredState, observed: ObservedState, plan: Plan, failures: FailureBook
    ) -> bool:
        """Answer the requests whose model is ready or cannot be had; True if any was."""
        answered = False
        for mid in self.wanted():
            decision = self._decide(mid, desired, observed, plan, failures)
            if decision is None:
                continue
            answered = True
            for _, fut in self._waiting.pop(mid):
                if isinstance(decision, LmxError):
                    fut.set_exception(decision)
                else:
                    fut.set_result(decision)
        return answered

    def fail_all(self, exc: LmxError) -> None:
        for _, _, fut in self._inbox:
            if not fut.done():
                fut.set_exception(exc)
        for waiters in self._waiting.values():
            for _, fut in waiters:
                if not fut.done():
                    fut.set_exception(exc)
        self._inbox, self._waiting = [], {}

    @staticmethod
    def _decide(
        mid: str,
        desired: DesiredState,
        observed: ObservedState,
        plan: Plan,
        failures: FailureBook,
    ) -> str | LmxError | None:
        """The model id when ready, an error to raise, or None to keep waiting."""
        spec = desired.models.get(mid)
        if spec is None or spec.want is Want.ABSENT:
            return ModelNotFound(mid, [])
        o = observed.model(mid)
        if o.ready:
            return mid
        blocked = plan.blocked_for(mid)
        if blocked is not None:
            what = f"model {mid!r} cannot be loaded now: {blocked.reason}: {blocked.message}"
            if blocked.reason is BlockReason.BACKING_OFF:
                fail = failures.current(mid, spec)
                cause = f"{fail.reason}: {fail.message}" if fail else "an earlier failure"
                wait = (o.retry_at_s or observed.now_s) - observed.now_s
                return TemporaryError(f"model {mid!r} failed ({cause})", delay_s=max(wait, 1.0))
            if blocked.reason is BlockReason.INSUFFICIENT_MEMORY:
                return TemporaryError(what, delay_s=_RETRY_S)
            if blocked.reason in TERMINAL_REASONS:  # ExceedsBudget: code exceeds_budget
                code = re.sub(r"(?<!^)(?=[A-Z])", "_", str(blocked.reason)).lower()
                return PermanentError(what, code=code)
        if not o.downloaded and not o.loading and not o.resident:
            state = "downloading" if o.downloading else "not downloaded yet"
            return TemporaryError(f"model {mid!r} is {state}", delay_s=10.0)
        return None
