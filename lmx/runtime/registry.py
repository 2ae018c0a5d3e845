"""The engine registry: the one owner of loaded engines, their in-flight counts and last use.

The reconciler decides what is resident and calls `load`/`unload`; the API calls `acquire` for
each request. The registry never decides to load or evict anything itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

import structlog

from lmx.errors import ModelNotFound, TemporaryError
from lmx.runtime.engine import Engine, EngineFactory, EngineState, LoadConfig

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class ResidentModel:
    """What the reconciler observes of one loaded engine."""

    model_id: str
    config: LoadConfig
    state: EngineState
    resident_bytes: int
    in_flight: int
    last_used_s: float
    draining: bool
    pid: int | None = None  # the engine's own process, if it has one
    context_length: int = 0  # the longest sequence it takes, prompt and answer
    ttl_s: float | None = None  # the idle TTL its latest request asked for (LM Studio's `ttl`)


@dataclass
class _Slot:
    engine: Engine
    in_flight: int = 0
    last_used_s: float = 0.0
    draining: bool = False
    ttl_s: float | None = None


class EngineRegistry:
    def __init__(
        self, factory: EngineFactory, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._factory = factory
        self._clock = clock
        self._slots: dict[str, _Slot] = {}
        self.on_change: Callable[[], None] = lambda: None
        # Called (model id, reason, whether it served any request) on the loop when a loaded
        # engine fails on its own.
        self.on_engine_failed: Callable[[str, str, bool], None] = lambda mid, reason, served: None

    def get(self, model_id: str) -> Engine | None:
        slot = self._slots.get(model_id)
        return slot.engine if slot else None

    def ids(self) -> list[str]:
        return list(self._slots)

    def snapshot(self) -> dict[str, ResidentModel]:
        return {
            mid: ResidentModel(
                model_id=mid,
                config=s.engine.config,
                state=EngineState.DRAINING if s.draining else s.engine.state,
                resident_bytes=s.engine.resident_bytes(),
                in_flight=s.in_flight,
                last_used_s=s.last_used_s,
                draining=s.draining,
                pid=s.engine.pid,
                context_length=s.engine.context_length,
                ttl_s=s.ttl_s,
            )
            for mid, s in self._slots.items()
        }

    async def load(self, config: LoadConfig) -> Engine:
        """Create and load an engine on a worker thread. Raises what the engine's load raises."""
        if config.model_id in self._slots:
            raise RuntimeError(f"model {config.model_id!r} is already loaded")
        engine = self._factory(config)
        await asyncio.to_thread(engine.load)
        loop = asyncio.get_running_loop()

        def failed(reason: str) -> None:
            with contextlib.suppress(RuntimeError):  # the loop closed: the daemon is stopping
                loop.call_soon_threadsafe(self._failed, config.model_id, engine, reason)

        engine.on_failure = failed
        self._slots[config.model_id] = _Slot(engine, last_used_s=self._clock())
        self.on_change()
        return engine

    def _failed(self, model_id: str, engine: Engine, reason: str) -> None:
        """A loaded engine failed on its own: forget it, so the reconciler sees it gone."""
        slot = self._slots.get(model_id)
        if slot is None or slot.engine is not engine:
            return
        del self._slots[model_id]
        log.error("engine_failed", model=model_id, reason=reason)
        self.on_engine_failed(model_id, reason, engine.stats().served > 0)
        self.on_change()

    def drain(self, model_id: str, draining: bool = True) -> None:
        """Stop (or resume) admitting requests to `model_id`; in-flight ones finish."""
        if slot := self._slots.get(model_id):
            slot.draining = draining

    async def unload(self, model_id: str) -> None:
        """Remove the engine and free it. In-flight requests must have drained first."""
        slot = self._slots.pop(model_id, None)
        if slot is None:
            return
        await asyncio.to_thread(slot.engine.unload)
        self.on_change()

    def touch(self, model_id: str) -> None:
        if slot := self._slots.get(model_id):
            slot.last_used_s = self._clock()

    @asynccontextmanager
    async def acquire(self, model_id: str, ttl_s: float | None = None) -> AsyncIterator[Engine]:
        """Hold `model_id` busy for one request, which may ask for the idle TTL of the engine
        (`ttl_s`; it lasts as long as the engine, the latest request's counting). Raises if it
        is not loaded or is draining."""
        slot = self._slots.get(model_id)
        if slot is None or slot.engine.state is not EngineState.READY:
            raise ModelNotFound(model_id, self.ids())
        if slot.draining:
            raise TemporaryError(f"model {model_id!r} is being unloaded", delay_s=1.0)
        slot.in_flight += 1
        slot.last_used_s = self._clock()
        if ttl_s is not None and ttl_s != slot.ttl_s:
            slot.ttl_s = ttl_s
            self.on_change()  # the reconciler's next wake may move
        try:
            yield slot.engine
        finally:
            slot.in_flight -= 1
            slot.last_used_s = self._clock()
            # Only a drain waits for in-flight requests; other passes read last use when they run.
            if slot.in_flight == 0 and slot.draining:
                self.on_change()
