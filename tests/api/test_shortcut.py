"""The generation routes' shortcut (lmx.api.shortcut): valid requests skip FastAPI's routing and
keep everything the route gave them; every other request gets the route's own answer."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import httpx
import pytest

from lmx.api import v1
from lmx.api.app import create_app
from lmx.api.auth import Keys
from lmx.api.deps import AppDeps
from lmx.runtime.registry import EngineRegistry
from tests.api.conftest import StaticModels
from tests.api.test_v1 import CHAT, assert_envelope, sse_events

COMPLETION = {"model": "tiny", "prompt": "Once upon", "max_tokens": 2}


class Solved:
    """Counts FastAPI's solving of the routes' dependencies: only a routed request does it."""

    def __init__(self, deps: AppDeps) -> None:
        self.deps = deps
        self.count = 0

    async def __call__(self) -> AppDeps:
        self.count += 1
        return self.deps


@pytest.fixture
async def routed(registry: EngineRegistry) -> AsyncIterator[tuple[httpx.AsyncClient, Solved]]:
    deps = AppDeps(registry=registry, models=StaticModels(registry))
    app = create_app(deps)
    solved = Solved(deps)
    app.dependency_overrides[v1.get_deps] = solved
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://lmx.test") as c:
        yield c, solved


async def test_valid_generation_requests_skip_fastapis_routing(
    routed: tuple[httpx.AsyncClient, Solved],
) -> None:
    client, solved = routed
    for path, body in (
        ("/v1/chat/completions", {**CHAT, "max_tokens": 2}),
        ("/v1/completions", COMPLETION),
    ):
        r = await client.post(path, json=body)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2, r.text
        r = await client.post(path, json={**body, "stream": True})
        assert r.status_code == 200 and sse_events(r.text)[-1] == "[DONE]", r.text
        # JSON by another name, as FastAPI's routes take it too (they do not see a client leave).
        suffixed = {"content-type": "application/vnd.api+json; charset=utf-8"}
        r = await client.post(path, content=json.dumps(body), headers=suffixed)
        assert r.status_code == 200, r.text
    assert solved.count == 0
    assert (await client.get("/v1/models")).status_code == 200
    assert solved.count == 1  # the test's override stands in for the routes' dependency


async def test_requests_it_does_not_take_get_the_routes_answer(
    routed: tuple[httpx.AsyncClient, Solved],
) -> None:
    client, solved = routed
    r = await client.post("/v1/chat/completions", json={**CHAT, "temperature": 7})
    assert_envelope(r, 400, "temperature")
    assert solved.count == 1
    r = await client.post(
        "/v1/completions",
        content=b'{"model": "tiny",',
        headers={"content-type": "application/json"},
    )
    err = assert_envelope(r, 400)
    assert err["message"].startswith("body: not valid JSON at character 17") and not err["param"]
    # JSON sent as another type: FastAPI's route does not read it as JSON, nor does the shortcut.
    r = await client.post(
        "/v1/completions", content=b'{"model": "tiny"}', headers={"content-type": "text/plain"}
    )
    assert "dictionary" in assert_envelope(r, 400)["message"]
    # Only POST is a generation request; the others are the router's.
    assert (await client.get("/v1/completions")).status_code == 405
    r = await client.post("/v1/completions/", json=COMPLETION)
    assert r.status_code == 307


async def test_the_endpoints_errors_keep_their_envelopes(
    routed: tuple[httpx.AsyncClient, Solved], monkeypatch: pytest.MonkeyPatch
) -> None:
    client, solved = routed
    r = await client.post("/v1/completions", json={**COMPLETION, "suffix": "!"})
    assert_envelope(r, 400, "suffix")
    r = await client.post("/v1/chat/completions", json={**CHAT, "model": "nope"})
    assert_envelope(r, 404, "model")

    async def broken(self: StaticModels, name: str) -> str:
        raise RuntimeError("the directory broke")

    monkeypatch.setattr(StaticModels, "ensure_ready", broken)
    r = await client.post("/v1/chat/completions", json=CHAT)
    err = assert_envelope(r, 500)
    assert err["message"] == "internal error: RuntimeError" and err["type"] == "server_error"
    assert solved.count == 0


async def test_responses_carry_the_request_id_and_count_by_route(
    routed: tuple[httpx.AsyncClient, Solved],
) -> None:
    client, _ = routed
    given = {"x-request-id": "req-from-the-client"}
    r = await client.post("/v1/completions", json=COMPLETION, headers=given)
    assert r.headers["x-request-id"] == "req-from-the-client"
    r = await client.post("/v1/completions", json=COMPLETION)
    assert r.headers["x-request-id"].startswith("req-")
    r = await client.post("/v1/completions", json={**COMPLETION, "model": "nope"})
    assert r.headers["x-request-id"].startswith("req-")
    text = (await client.get("/metrics")).text
    assert 'lmx_requests_total{route="/v1/completions",status="200"} 2.0' in text
    assert 'lmx_requests_total{route="/v1/completions",status="404"} 1.0' in text


async def test_keys_guard_the_generation_routes(registry: EngineRegistry) -> None:
    keys = Keys(admin=lambda: "admin", inference=lambda: ("k1",))
    app = create_app(AppDeps(registry=registry, models=StaticModels(registry), keys=keys))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        for path, body in (("/v1/chat/completions", CHAT), ("/v1/completions", COMPLETION)):
            r = await c.post(path, json={**body, "max_tokens": 1})
            assert assert_envelope(r, 401)["code"] == "invalid_api_key"
            assert r.headers["www-authenticate"] == "Bearer"
            r = await c.post(path, json=body, headers={"Authorization": "Bearer k2"})
            assert_envelope(r, 401)
            for key in ("k1", "admin"):
                headers = {"Authorization": f"Bearer {key}"}
                r = await c.post(path, json={**body, "max_tokens": 1}, headers=headers)
                assert r.status_code == 200, r.text
