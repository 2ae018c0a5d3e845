"""The event bus: reconcile actions, condition changes and download progress, fanned out to
subscribers (the admin SSE stream, tests).

Publishing never blocks and never fails: each subscriber has a bounded queue, and a slow one loses
its oldest events (it is told how many in a `dropped` event). Every event has a `seq`, and the bus
keeps the last `history` of them, so a subscriber that reconnects can resume after the last one
it saw (SSE's Last-Event-ID). `close()` ends every subscription (shutdown). Event-loop thread only.

Seqs go on from the microseconds since the epoch at the bus's start, not from 1: a subscriber that
saw event 50 before the daemon restarted, and reconnects once the new daemon has published 80,
would otherwise be sent the new daemon's events from 51 on, missing its first 50.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import deque
from collections.abc import AsyncIterator
from typing import Any

Event = dict[str, Any]


class Subscription(AsyncIterator[Event]):
    """Registered from creation, so no event published after `subscribe()` returns is missed."""

    def __init__(self, bus: EventBus, maxsize: int) -> None:
        self._bus = bus
        self._queue: asyncio.Queue[Event | None] = asyncio.Queue(maxsize)
        self._dropped = 0
        self._ended = False

    def offer(self, event: Event | None) -> None:
        if self._queue.full():
            self._queue.get_nowait()
            self._dropped += 1
        self._queue.put_nowait(event)

    def end(self) -> None:
        """End the iteration once what is queued has been taken (the bus is closing)."""
        self._ended = True
        if not self._queue.full():  # wakes a reader waiting on an empty queue; a full one
            self._queue.put_nowait(None)  # ends by `_ended` once drained, losing nothing

    def missed(self, count: int) -> None:
        self._dropped += count

    async def __anext__(self) -> Event:
        """The next event; raises StopAsyncIteration once the bus has closed."""
        if self._dropped:
            n, self._dropped = self._dropped, 0
            return {"type": "dropped", "count": n, "time": time.time()}
        if self._ended and self._queue.empty():
            raise StopAsyncIteration
        event = await self._queue.get()
        if event is None:
            raise StopAsyncIteration
        return event

    def pending(self) -> list[Event]:
        """Take every queued event without waiting."""
        out = []
        while not self._queue.empty():
            if (event := self._queue.get_nowait()) is not None:
                out.append(event)
        return out

    def close(self) -> None:
        self._bus.unsubscribe(self)

    async def aclose(self) -> None:
        self.close()


class EventBus:
    def __init__(
        self, *, maxsize: int = 256, history: int = 1024, first_seq: int | None = None
    ) -> None:
        """`first_seq`: its first event's (by default the microseconds since the epoch)."""
        self._maxsize = maxsize
        self._subs: list[Subscription] = []
        self._first = time.time_ns() // 1000 if first_seq is None else first_seq
        self._seq = itertools.count(self._first)
        self._last = self._first - 1
        self._history: deque[Event] = deque(maxlen=history)
        self._closed = False

    def subscribe(self, after: int | None = None) -> Subscription:
        """A new subscription; with `after` (the last `seq` a subscriber saw), it starts with the
        kept events since then and a `dropped` count of those no longer kept. An `after` this
        bus never published comes from another run of the daemon (it restarted): every event of
        this one is new to it."""
        sub = Subscription(self, self._maxsize)
        if after is not None:
            if not self._first <= after <= self._last:
                after = self._first - 1
            kept = [e for e in self._history if e["seq"] > after]
            first = kept[0]["seq"] if kept else self._last + 1
            if first > after + 1:
                sub.missed(first - after - 1)
            for event in kept:
                sub.offer(event)
        if self._closed:
            sub.end()
        else:
            self._subs.append(sub)
        return sub

    def close(self) -> None:
        """End every subscription, now and to come, after the events already queued for it
        (the daemon is stopping: open event streams must end, not hold the shutdown up)."""
        self._closed = True
        for sub in self._subs:
            sub.end()
        self._subs.clear()

    def unsubscribe(self, sub: Subscription) -> None:
        if sub in self._subs:
            self._subs.remove(sub)

    def publish(self, type_: str, **fields: Any) -> Event:
        event: Event = {"type": type_, "seq": next(self._seq), "time": time.time(), **fields}
        self._last = event["seq"]
        self._history.append(event)
        for sub in self._subs:
            sub.offer(event)
        return event
