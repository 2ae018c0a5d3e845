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


async def test_admin_is_never_open_to_other_origins(client: httpx.AsyncClient) -> None:
    client.origins[0] = ("*",)  # type: ignore[attr-defined]
    evil = {"Origin": "http://evil.example"}
    r = await client.get("/admin/status", headers=evil)  # 400 here: these deps manage nothing
    assert "access-control-allow-origin" not in r.headers
    preflight = {**evil, "Access-Control-Request-Method": "PATCH"}
    r = await client.options("/admin/desired", headers=preflight)
    assert r.status_code != 204 and "access-control-allow-origin" not in r.headers


async def test_an_unexpected_error_is_a_500_envelope_with_the_id_cors_and_its_count(
    registry: EngineRegistry,
) -> None:
    deps = AppDeps(registry=registry, models=StaticModels(registry), cors_origins=lambda: ("*",))
    app = create_app(deps)

    async def broken() -> None:
        raise KeyError("a bug")

    app.add_api_route("/v1/broken", broken)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://lmx.test") as c:
        r = await c.get("/v1/broken", headers={"Origin": ALLOWED, "x-request-id": "req-bug"})
    assert r.status_code == 500
    assert r.json()["error"] == {
        "message": "internal error: KeyError",
        "type": "server_error",
        "param": None,
        "code": None,
    }
    assert r.headers["x-request-id"] == "req-bug"
    assert r.headers["access-control-allow-origin"] == ALLOWED
    assert 'route="/v1/broken",status="500"' in deps.metrics.render().decode()
