"""The API counts the generation requests it is preparing, and nothing else, for the intake."""

from __future__ import annotations

import asyncio

import httpx
from starlette.types import Receive, Scope, Send

from lmx.api.app import CountIntake
from lmx.runtime.intake import Intake


async def test_only_generation_requests_hold_a_burst() -> None:
    intake = Intake(max_hold_s=10.0)
    flushed = asyncio.Event()

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["path"] == "/first":  # not a generation route: its handler plays one
            with intake.preparing():
                intake.reached_engine()
                intake.hold("m", flushed.set)
        else:
            await asyncio.sleep(0.2)  # preparing: parsing, templating, tokenizing
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    transport = httpx.ASGITransport(app=CountIntake(app, intake))
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:

        async def flushed_while(method: str, path: str) -> bool:
            other = asyncio.create_task(client.request(method, path))
            await asyncio.sleep(0.05)  # the other request is being prepared
            flushed.clear()
            await client.post("/first")
            await asyncio.sleep(0.05)
            during = flushed.is_set()
            await other
            await asyncio.wait_for(flushed.wait(), 5)
            return during

        assert not await flushed_while("POST", "/v1/chat/completions")
        assert not await flushed_while("POST", "/v1/completions")
        assert await flushed_while("GET", "/v1/models")
        assert await flushed_while("POST", "/admin/desired")


async def test_a_burst_is_counted_before_any_of_it_is_prepared() -> None:
    # Requests read in one turn of the event loop: each handler prepares its request without
    # yielding (templating, tokenizing) and hands it to its engine. If the first one got there
    # before the others were counted, its engine would see nothing coming and start it alone.
    intake = Intake()
    coming_at_engine: list[int] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        coming_at_engine.append(intake.count_coming("m", lambda: None))
        intake.reached_engine()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    transport = httpx.ASGITransport(app=CountIntake(app, intake))
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        await asyncio.gather(*(client.post("/v1/completions") for _ in range(4)))
    assert coming_at_engine == [4, 3, 2, 1]  # itself included
