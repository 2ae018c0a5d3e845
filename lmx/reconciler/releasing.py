"""Did an unload give its memory back? Verification with both signals, and the ledger of memory
that has not come back yet.

Owned by the executor. After each unload it asks the allocators to return freed pages (gc, MLX's
cache, glibc's malloc_trim) and polls until MLX's active bytes and the process RSS both fell by
about what the load took. What is missing stays charged to the budget, and is re-measured on every
pass until it comes back. Loads that would fit without it wait for a grace period, then go on.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass

import structlog

from lmx.reconciler.settings import ReconcilerSettings
from lmx.runtime.memory import MemoryProbe, MemorySample, Usage, shortfall
from lmx.runtime.registry import EngineRegistry

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class Before:
    """Memory just before a load or an unload."""

    sample: MemorySample
    others: int  # bytes the other engines reported then (their growth is not ours)


@dataclass(frozen=True)
class Leak:
    before: Before
    expected: Usage
    bytes: int
    since_s: float


class Releases:
    def __init__(
        self,
        settings: ReconcilerSettings,
        *,
        memory: MemoryProbe,
        registry: EngineRegistry,
        clock: Callable[[], float],
    ) -> None:
        self._s = settings
        self._memory = memory
        self._registry = registry
        self._clock = clock
        self.leaks: dict[str, Leak] = {}
        self.blocking = False  # a leak appeared during the current plan: skip its loads

    @property
    def unreleased_bytes(self) -> int:
        return sum(leak.bytes for leak in self.leaks.values())

    @property
    def releasing(self) -> bool:
        """Whether some missing memory is still within its grace period."""
        now = self._clock()
        return any(now < leak.since_s + self._s.release_grace_s for leak in self.leaks.values())

    def measure(self, *, exclude: str) -> Before:
        snap = self._registry.snapshot()
        others = sum(m.resident_bytes for mid, m in snap.items() if mid != exclude)
        return Before(self._memory.sample(), others)

    def _others_growth(self, before: Before, exclude: str) -> int:
        return self.measure(exclude=exclude).others - before.others

    async def verify(self, model_id: str, before: Before, expected: Usage) -> int:
        """Poll until the unload's memory is back; return the bytes still missing (0 if none)."""
        deadline = time.monotonic() + self._s.release_timeout_s
        collect = collected = False  # engines collect on unload: a full collection if still short
        while True:
            await asyncio.to_thread(self._memory.release, collect=collect)
            growth = self._others_growth(before, model_id)
            missing = shortfall(
                before.sample, self._memory.sample(), expected, others_growth=growth
            )
            if missing == 0 or time.monotonic() >= deadline:
                break
            collect, collected = not collected, True
            await asyncio.sleep(self._s.release_poll_s)
        if missing:
            self.leaks[model_id] = Leak(before, expected, missing, self._clock())
            self.blocking = True
            log.warning("memory_not_released", model=model_id, missing_bytes=missing)
        else:
            self.leaks.pop(model_id, None)
        return missing

    async def recheck(self) -> list[str]:
        """Re-measure memory still missing; return the models whose memory came back since."""
        if not self.leaks:
            return []
        await asyncio.to_thread(self._memory.release)
        now = self._memory.sample()
        back = []
        for mid, leak in list(self.leaks.items()):
            growth = self._others_growth(leak.before, mid)
            missing = shortfall(leak.before.sample, now, leak.expected, others_growth=growth)
            if missing == 0:
                del self.leaks[mid]
                back.append(mid)
                log.info("memory_released_late", model=mid, waited_s=self._clock() - leak.since_s)
            elif missing != leak.bytes:
                self.leaks[mid] = Leak(leak.before, leak.expected, missing, leak.since_s)
        return back
