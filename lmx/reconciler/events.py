"""The event bus: reconcile actions, condition changes and download progress, fanned out to
subscribers (the admin SSE stream, tests).

Publishing never blocks and never fails: each subscriber has a bounded queue, and a slow one loses
its oldest events (it is told how many in a `dropped` event). Event-loop thread only.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator
from typing import Any

Event = dict[str, Any]


class Subscription(AsyncIterator[Event]):
    """Registered from creation, so no event published after `subscribe()` returns is missed."""

    def __init__(self, bus: EventBus, maxsize: int) -> None:
        self._bus = bus
        self._queue: asyncio.Queue[Event] = asyncio.Queue(maxsize)
        self._dropped = 0

    def offer(self, event: Event) -> None:
        if self._queue.full():
            self._queue.get_nowait()
            self._dropped += 1
        self._queue.put_nowait(event)

    async def __anext__(self) -> Event:
        if self._dropped:
            n, self._dropped = self._dropped, 0
            return {"type": "dropped", "count": n, "time": time.time()}
        return await self._queue.get()

    def pending(self) -> list[Event]:
        """Take every queued event without waiting."""
        out = []
        while not self._queue.empty():
            out.append(self._queue.get_nowait())
        return out

    def close(self) -> None:
        self._bus.unsubscribe(self)

    async def aclose(self) -> None:
        self.close()


class EventBus:
    def __init__(self, *, maxsize: int = 256) -> None:
        self._maxsize = maxsize
        self._subs: list[Subscription] = []
        self._seq = itertools.count(1)

    def subscribe(self) -> Subscription:
        sub = Subscription(self, self._maxsize)
        self._subs.append(sub)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        if sub in self._subs:
            self._subs.remove(sub)

    def publish(self, type_: str, **fields: Any) -> Event:
        event: Event = {"type": type_, "seq": next(self._seq), "time": time.time(), **fields}
        for sub in self._subs:
            sub.offer(event)
        return event
