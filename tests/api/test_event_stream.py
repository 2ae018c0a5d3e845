"""An SSE response (lmx.api.v1.EventStream) ends when its client leaves, and only then; its headers
go out at once, and a comment whenever it has been quiet for a while."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from lmx.api.chunks import KEEPALIVE
from lmx.api.v1 import EventStream

SCOPE = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}}  # as uvicorn's


class Exchange:
    """A body that waits for more after its first event, and a client that leaves on a signal."""

    def __init__(self) -> None:
        self.sent: list[dict[str, Any]] = []
        self.body_closed = asyncio.Event()
        self.leaving = asyncio.Event()
        self.first_event_out = asyncio.Event()

    async def body(self) -> AsyncIterator[bytes]:
        try:
            yield b"data: 1\n\n"
            await asyncio.sleep(60)  # the engine has nothing more yet
            yield b"data: 2\n\n"
        finally:
            self.body_closed.set()

    async def receive(self) -> dict[str, Any]:
        await self.leaving.wait()
        return {"type": "http.disconnect"}

    async def send(self, message: dict[str, Any]) -> None:
        self.sent.append(message)
        if message.get("body"):
            self.first_event_out.set()

    def respond(self, on_first: Callable[[], None] = lambda: None) -> asyncio.Task[None]:
        task = asyncio.create_task(EventStream(self.body())(SCOPE, self.receive, self.send))
        self.first_event_out.clear()

        async def then() -> None:
            await self.first_event_out.wait()
            on_first()

        asyncio.get_running_loop().create_task(then())
        return task


async def test_a_client_leaving_ends_the_response_and_closes_its_body() -> None:
    x = Exchange()
    task = x.respond(on_first=x.leaving.set)
    done, _ = await asyncio.wait({task}, timeout=5)  # the body would wait for a minute
    assert task in done
    task.result()  # returns: the client's leaving is no error
    assert x.body_closed.is_set()
    assert [m.get("body") for m in x.sent] == [None, b"data: 1\n\n"]


async def test_a_cancel_from_elsewhere_still_cancels() -> None:
    x = Exchange()
    task = x.respond()
    await asyncio.wait_for(x.first_event_out.wait(), 5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, 5)
    assert x.body_closed.is_set()

    # The same when the client leaves at the moment the task is cancelled.
    x = Exchange()
    both: list[asyncio.Task[None]] = []

    def leave_and_cancel() -> None:
        x.leaving.set()
        both[0].cancel()

    both.append(x.respond(on_first=leave_and_cancel))
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(both[0], 5)
    assert x.body_closed.is_set()


async def test_a_body_that_ends_leaves_nothing_waiting() -> None:
    x = Exchange()

    async def short() -> AsyncIterator[bytes]:
        yield b"data: [DONE]\n\n"

    before = asyncio.all_tasks()
    await EventStream(short())(SCOPE, x.receive, x.send)
    await asyncio.sleep(0)  # the watcher's cancellation is delivered
    assert asyncio.all_tasks() == before
    assert x.sent[-1] == {
        "type": "http.response.body",
        "body": b"data: [DONE]\n\n",
        "more_body": False,
    }


class Timed(Exchange):
    """An exchange that notes when each message went out (the event loop's clock)."""

    def __init__(self) -> None:
        super().__init__()
        self.times: list[float] = []

    async def send(self, message: dict[str, Any]) -> None:
        self.times.append(asyncio.get_running_loop().time())
        await super().send(message)

    def bodies(self) -> list[bytes | None]:
        return [m.get("body") for m in self.sent]


async def test_a_quiet_stream_begins_at_once_and_is_kept_alive_until_its_first_event() -> None:
    x, prefilled = Timed(), asyncio.Event()

    async def prefilling() -> AsyncIterator[bytes]:
        await prefilled.wait()  # a long prompt, or a wait for a place in the batch
        yield b"data: 1\n\n"
        yield b"data: [DONE]\n\n"

    stream = EventStream(prefilling())
    stream.keepalive_s = 0.05
    task = asyncio.create_task(stream(SCOPE, x.receive, x.send))
    await asyncio.sleep(0.01)
    assert [m["type"] for m in x.sent] == ["http.response.start"]  # no token yet: the headers
    await asyncio.sleep(0.4)
    prefilled.set()
    await asyncio.wait_for(task, 5)
    bodies = x.bodies()
    kept = bodies[1:-2]
    assert len(kept) >= 2 and set(kept) == {KEEPALIVE}
    assert bodies[-2:] == [b"data: 1\n\n", b"data: [DONE]\n\n"]
    assert x.sent[-1]["more_body"] is False
    gaps = [b - a for a, b in zip(x.times[: len(kept)], x.times[1 : len(kept) + 1], strict=True)]
    assert min(gaps) >= 0.05 * 0.9, gaps  # at most one per quiet interval
    await asyncio.sleep(0.2)
    assert len(x.sent) == len(bodies)  # nothing after its end


async def test_a_stream_whose_events_flow_gets_no_comment() -> None:
    x = Timed()

    async def flowing() -> AsyncIterator[bytes]:
        for i in range(20):
            await asyncio.sleep(0.01)
            yield f"data: {i}\n\n".encode()

    stream = EventStream(flowing())
    stream.keepalive_s = 0.15
    await asyncio.wait_for(stream(SCOPE, x.receive, x.send), 5)
    bodies = x.bodies()
    assert KEEPALIVE not in bodies
    assert bodies[1:] == [f"data: {i}\n\n".encode() for i in range(20)] + [b""]


async def test_a_response_whose_first_send_fails_still_ends_its_generation() -> None:
    """Its body never began (the client was gone): the generation it would have rendered is
    closed all the same, its sequences cancelled and their places freed."""
    x, closed = Exchange(), []

    class Generation:
        async def close(self) -> None:
            closed.append(True)

    async def gone(message: dict[str, Any]) -> None:
        raise OSError("the client is gone")

    stream = EventStream(x.body(), Generation())  # type: ignore[arg-type]
    with pytest.raises(OSError):
        await asyncio.wait_for(stream(SCOPE, x.receive, gone), 5)
    assert closed == [True]
