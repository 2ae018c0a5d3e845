"""Bursts of requests join a model's batch together.

Clients often send at the same moment: the streams of one batch get their last token in the same
step and send again, an agent fans out its tool calls. If each request reached the worker on its
own, the first would start a prefill alone and every later one would wait a step behind it,
with a prefill of its own that stalls the whole batch again. So the API counts the generation
requests it is still preparing (reading, validating, templating, tokenizing), and an engine holds
what it would send to its worker while any of them may be for its model (it is, or has not named
one yet): the burst reaches the worker as one message and shares one prefill. A lone request
waits for nothing. A hold lasts `max_hold_s` at most, and a request still preparing after that
long (a model load, a huge prompt) holds nobody.

An idle worker also waits for the requests that may be for its model and are still being prepared
(`count_coming`), but not for one prepared for longer than `COMING_FOR_S` (waiting for its model
to load or download): that is nobody's burst.

One `Intake` per event loop; nothing here touches MLX.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

from lmx.runtime.steptrace import Arrival, TraceLog

MAX_HOLD_S = 0.025
COMING_FOR_S = 0.15  # as long as an idle worker waits for a burst (lmx.runtime.mlx_worker)
_TRACE_FLUSH_S = 0.05


@dataclass
class _Ticket:
    arrived: float  # time.monotonic()
    model: str | None = None  # the model id, once the request has named one that is ready


# The request being handled in this context: its intake and its ticket.
_current: ContextVar[tuple[Intake, int] | None] = ContextVar("lmx_intake_ticket", default=None)


class Intake:
    def __init__(self, max_hold_s: float = MAX_HOLD_S) -> None:
        self.max_hold_s = max_hold_s
        self._tickets = itertools.count()
        self._preparing: dict[int, _Ticket] = {}
        self._held: list[tuple[float, str, Callable[[], None]]] = []  # (deadline, model, flush)
        self._when_none: list[tuple[str, Callable[[], None]]] = []  # see count_coming
        self._timer: asyncio.TimerHandle | None = None
        self._trace = TraceLog.from_env("arrivals")  # for bench/ (lmx.runtime.steptrace)

    @contextmanager
    def preparing(self) -> Iterator[None]:
        """Around the API's handling of one generation request, until it reaches an engine."""
        ticket = next(self._tickets)
        self._preparing[ticket] = _Ticket(time.monotonic())
        self._log("api")
        token = _current.set((self, ticket))
        try:
            yield
        finally:
            _current.reset(token)
            self._settle(ticket)

    def count_coming(self, model: str, when_none: Callable[[], None]) -> int:
        """Requests being prepared now that may come to `model`'s engine (which tells its idle
        worker to wait for them). If any, `when_none` runs once (on the event loop) when none is,
        so the engine can tell its worker to stop waiting, whether they came to it, named
        another model, or failed."""
        coming = self._coming(model)
        if coming and (model, when_none) not in self._when_none:
            self._when_none.append((model, when_none))
        return coming

    def concerns(self, model: str) -> None:
        """The request handled in this context is for `model` (ready to serve it): it no longer
        counts as coming to other models' engines."""
        current = _current.get()
        if current is not None and current[0] is self and current[1] in self._preparing:
            self._preparing[current[1]].model = model
            self._tell_none()

    def reached_engine(self) -> None:
        """The request handled in this context has handed its work to an engine."""
        current = _current.get()
        if current is not None and current[0] is self:
            if current[1] in self._preparing:
                self._log("engine")
            self._settle(current[1])

    def hold(self, model: str, flush: Callable[[], None]) -> None:
        """Call `flush` (once) when no request that may be for `model` is still being prepared,
        or `max_hold_s` from now at the latest; never before the end of this turn of the event
        loop, so requests that arrived with this one get counted first."""
        self._held.append((time.monotonic() + self.max_hold_s, model, flush))
        asyncio.get_running_loop().call_soon(self._check)

    def _log(self, at: str) -> None:
        """An Arrival for bench/, written to disk shortly after, off the request's way."""
        if self._trace is None:
            return
        if not self._trace.pending:
            asyncio.get_running_loop().call_later(_TRACE_FLUSH_S, self._trace.flush)
        self._trace.write(Arrival(time.perf_counter(), at))

    def _coming(self, model: str, within_s: float = COMING_FOR_S) -> int:
        """Requests being prepared that may be for `model`, for less than `within_s` so far."""
        since = time.monotonic() - within_s
        return sum(
            1 for t in self._preparing.values() if t.model in (None, model) and t.arrived > since
        )

    def _tell_none(self) -> None:
        """Run the `when_none` of each engine that has no request coming any more."""
        if not self._when_none:
            return
        loop = asyncio.get_running_loop()
        waiting, self._when_none = self._when_none, []
        for model, when_none in waiting:
            if self._coming(model):
                self._when_none.append((model, when_none))
            else:
                loop.call_soon(when_none)

    def _settle(self, ticket: int) -> None:
        if self._preparing.pop(ticket, None) is None:
            return
        if self._held:
            asyncio.get_running_loop().call_soon(self._check)
        self._tell_none()

    def _check(self) -> None:
        now = time.monotonic()
        held, self._held = self._held, []
        for deadline, model, flush in held:
            if now < deadline and self._coming(model, self.max_hold_s):
                self._held.append((deadline, model, flush))
            else:
                flush()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._held:
            deadline = min(d for d, _, _ in self._held)
            self._timer = asyncio.get_running_loop().call_later(deadline - now, self._expire)

    def _expire(self) -> None:
        self._timer = None
        self._check()
