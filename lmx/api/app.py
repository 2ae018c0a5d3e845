"""The application factory. `create_app(deps)` wires routers, the error envelope and the lifespan.

There is no module-level app: the CLI and the tests each build their own with their own deps.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import structlog
from fastapi import FastAPI, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from lmx import __version__
from lmx.api import admin, errors, lmstudio, lmstudio_v1, v1
from lmx.api.cors import DynamicCORS
from lmx.api.deps import AppDeps
from lmx.api.generation import new_id
from lmx.api.metrics import Metrics
from lmx.api.shortcut import Shortcut
from lmx.runtime.intake import Intake

log = structlog.get_logger(__name__)

Hook = Callable[[], Awaitable[None]]


class RequestContext:
    """Binds `request_id` for logs, echoes it as `x-request-id` and `request-id` and counts
    responses by route and status; answers an error that no handler took with the 500 envelope
    (lmx.api.errors), so that one too is counted and carries the id and, from the middleware
    around this one, CORS headers.
    Plain ASGI, so streamed bodies pass straight through (a BaseHTTPMiddleware relays every chunk
    through a task)."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.requests = metrics.requests

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = dict(scope["headers"]).get(b"x-request-id")
        rid = given.decode("latin-1") if given else new_id("req")

        started = False

        async def send_with_id(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                # Anthropic's SDK reads its request id from `request-id`.
                ids = [(b"x-request-id", rid.encode()), (b"request-id", rid.encode())]
                message["headers"] = [*message.get("headers", []), *ids]
                # The route template, not the raw path, keeps the label set small.
                route = getattr(scope.get("route"), "path", "unmatched")
                self.requests.labels(route, str(message["status"])).inc()
            await send(message)

        with structlog.contextvars.bound_contextvars(request_id=rid):
            try:
                await self.app(scope, receive, send_with_id)
            except Exception as exc:
                if started:  # too late for a status: the server ends the response
                    raise
                await errors.unexpected(exc, scope["path"])(scope, receive, send_with_id)


# The generation routes, whose requests the intake counts while they are prepared.
_GENERATION = v1.GENERATION.keys() | lmstudio.GENERATION.keys() | lmstudio_v1.GENERATION.keys()


class CountIntake:
    """Counts the generation requests being prepared (lmx.runtime.intake), from their arrival
    until they reach an engine or end. Plain ASGI, and in the request's own task, so the engine
    sees the request's ticket."""

    def __init__(self, app: ASGIApp, intake: Intake) -> None:
        self.app = app
        self.intake = intake

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] not in _GENERATION:
            await self.app(scope, receive, send)
            return
        with self.intake.preparing():
            # Let the requests read in the same turn of the event loop be counted before this
            # one is prepared (without yielding, ~0.3-2 ms): a burst written together then
            # reaches its engine, and the worker, as one (the first request of 32 had found none
            # of the others counted, and went alone).
            await asyncio.sleep(0)
            await self.app(scope, receive, send)


def readiness(status: dict[str, Any]) -> tuple[bool, dict[str, Any]]:
    config = status.get("config", {})
    waiting = [
        mid
        for mid, m in status.get("models", {}).items()
        if m.get("want") == "pinned"
        and not any(c["type"] == "Ready" and c["status"] for c in m.get("conditions", []))
    ]
    ready = bool(config.get("valid", True)) and not waiting
    body = {
        "status": "ready" if ready else "not_ready",
        "config_valid": config.get("valid", True),
        "config_error": config.get("error"),
        "pinned_not_ready": waiting,
    }
    return ready, body


def create_app(
    deps: AppDeps, *, on_startup: Hook | None = None, on_shutdown: Hook | None = None
) -> FastAPI:
    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        if on_startup is not None:
            await on_startup()
        try:
            yield
        finally:
            if on_shutdown is not None:
                await on_shutdown()

    app = FastAPI(
        title="lmx",
        version=__version__,
        description="OpenAI-compatible local inference with a declarative model lifecycle.",
        lifespan=lifespan,
    )
    if not deps.served_since_s:
        deps.served_since_s = time.time()
    app.state.deps = deps
    errors.install(app)
    app.include_router(v1.router)
    app.include_router(lmstudio.router)
    app.include_router(lmstudio_v1.router)
    app.include_router(admin.router)

    app.add_middleware(
        Shortcut,
        api=app,
        deps=deps,
        ways=v1.SHORTCUTS | lmstudio.SHORTCUTS | lmstudio_v1.GENERATION,
    )
    app.add_middleware(CountIntake, intake=deps.intake)
    app.add_middleware(RequestContext, metrics=deps.metrics)
    app.add_middleware(DynamicCORS, origins=deps.cors_origins)

    @app.get("/healthz", tags=["health"])
    async def healthz() -> dict[str, str]:
        """The process is up and its event loop answers."""
        return {"status": "ok"}

    @app.get("/metrics", tags=["health"], response_class=Response)
    async def metrics() -> Response:
        """Prometheus text format."""
        return Response(deps.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/readyz", tags=["health"], response_model=None)
    async def readyz() -> JSONResponse:
        """Ready: the config is valid and every pinned model is loaded and ready (else 503)."""
        ready, body = readiness(deps.models.status())
        return JSONResponse(body, status_code=200 if ready else 503)

    return app
