"""CORS for browser clients: allowed origins get the headers and preflights; others get nothing."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest

from lmx.api.app import create_app
from lmx.api.auth import Keys
from lmx.api.deps import AppDeps
from lmx.runtime.registry import EngineRegistry
from tests.api.conftest import StaticModels

ALLOWED = "http://localhost:3000"


@pytest.fixture
async def client(registry: EngineRegistry) -> AsyncIterator[httpx.AsyncClient]:
    origins: list[tuple[str, ...]] = [(ALLOWED,)]
    deps = AppDeps(
        registry=registry,
        models=StaticModels(registry),
        cors_origins=lambda: origins[0],
        keys=Keys(inference=lambda: ("k",)),
    )
    transport = httpx.ASGITransport(app=create_app(deps))
    async with httpx.AsyncClient(transport=transport, base_url="http://lmx.test") as c:
        c.origins = origins  # type: ignore[attr-defined]
        yield c


async def test_preflight_from_an_allowed_origin_is_answered_before_auth(
    client: httpx.AsyncClient,
) -> None:
    r = await client.options(
        "/v1/chat/completions",
        headers={
            "Origin": ALLOWED,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type",
        },
    )
    assert r.status_code == 204
    assert r.headers["access-control-allow-origin"] == ALLOWED
    assert "POST" in r.headers["access-control-allow-methods"]
    assert r.headers["access-control-allow-headers"] == "authorization, content-type"


async def test_responses_to_an_allowed_origin_carry_the_header(client: httpx.AsyncClient) -> None:
    r = await client.get("/v1/models", headers={"Origin": ALLOWED, "Authorization": "Bearer k"})
    assert r.status_code == 200
    assert r.headers["access-control-allow-origin"] == ALLOWED
    # Errors too, so that a browser can read why it was refused.
    r = await client.get("/v1/models", headers={"Origin": ALLOWED})
    assert r.status_code == 401
    assert r.headers["access-control-allow-origin"] == ALLOWED


async def test_other_origins_get_no_cors_headers_and_the_list_is_live(
    client: httpx.AsyncClient,
) -> None:
    evil = {"Origin": "http://evil.example", "Authorization": "Bearer k"}
    r = await client.get("/v1/models", headers=evil)
    assert "access-control-allow-origin" not in r.headers
    client.origins[0] = ("*",)  # type: ignore[attr-defined]
    r = await client.get("/v1/models", headers=evil)
    assert r.headers["access-control-allow-origin"] == "http://evil.example"
