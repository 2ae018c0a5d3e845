"""Bursts of requests join a model's batch together.

Clients often send at the same moment: the streams of one batch get their last token in the same
step and send again, an agent fans out its tool calls. If each request reached the worker on its
own, the first would start a prefill alone and every later one would wait a step behind it,
with a prefill of its own that stalls the whole batch again. So the API counts the generation
requests it is still preparing (reading, validating, templating, tokenizing), and an engine holds
what it would send to its worker while any of them is: the burst reaches the worker as one message
and shares one prefill. A lone request waits for nothing. A hold lasts `max_hold_s` at most, and a
request still preparing after that long (a model load, a huge prompt) holds nobody.

One `Intake` per event loop; nothing here touches MLX.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar

MAX_HOLD_S = 0.025

# The request being handled in this context: its intake and its ticket.
_current: ContextVar[tuple[Intake, int] | None] = ContextVar("lmx_intake_ticket", default=None)


class Intake:
    def __init__(self, max_hold_s: float = MAX_HOLD_S) -> None:
        self.max_hold_s = max_hold_s
        self._tickets = itertools.count()
        self._preparing: dict[int, float] = {}  # ticket -> when its request arrived
        self._held: list[tuple[float, Callable[[], None]]] = []  # (deadline, flush)
        self._when_none: list[Callable[[], None]] = []  # see count_coming
        self._timer: asyncio.TimerHandle | None = None

    @contextmanager
    def preparing(self) -> Iterator[None]:
        """Around the API's handling of one generation request, until it reaches an engine."""
        ticket = next(self._tickets)
        self._preparing[ticket] = time.monotonic()
        token = _current.set((self, ticket))
        try:
            yield
        finally:
            _current.reset(token)
            self._settle(ticket)

    def count_coming(self, when_none: Callable[[], None]) -> int:
        """Requests being prepared now (an engine tells its idle worker to wait for them). If
        any, `when_none` runs once (on the event loop) when none is, so the engine can tell its
        worker to stop waiting, whether they came to it, went to another model, or failed."""
        if self._preparing and when_none not in self._when_none:
            self._when_none.append(when_none)
        return len(self._preparing)

    def reached_engine(self) -> None:
        """The request handled in this context has handed its work to an engine."""
        current = _current.get()
        if current is not None and current[0] is self:
            self._settle(current[1])

    def hold(self, flush: Callable[[], None]) -> None:
        """Call `flush` (once) when no request is still being prepared, or `max_hold_s` from now
        at the latest; never before the end of this turn of the event loop, so requests that
        arrived with this one get counted first."""
        self._held.append((time.monotonic() + self.max_hold_s, flush))
        asyncio.get_running_loop().call_soon(self._check)

    def _settle(self, ticket: int) -> None:
        if self._preparing.pop(ticket, None) is None:
            return
        loop = asyncio.get_running_loop()
        if self._held:
            loop.call_soon(self._check)
        if not self._preparing:
            waiting, self._when_none = self._when_none, []
            for when_none in waiting:
                loop.call_soon(when_none)

    def _check(self) -> None:
        if not self._held:
            return
        now = time.monotonic()
        fresh = any(now - t < self.max_hold_s for t in self._preparing.values())
        deadline = min(d for d, _ in self._held)
        if fresh and now < deadline:
            if self._timer is None:
                self._timer = asyncio.get_running_loop().call_later(deadline - now, self._expire)
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        held, self._held = self._held, []
        for _, flush in held:
            flush()

    def _expire(self) -> None:
        self._timer = None
        self._check()
