"""The inference routes' straight way in: a valid JSON request skips FastAPI's routing.

FastAPI's route matching, dependency solving and body parsing were about a quarter of the daemon's
CPU per streamed request (bench.http_overhead, 32 streams of 2-token completions: 0.59 ms per token
before, 0.44 after). When 32 clients send their next requests together, the daemon prepares them one
after another and the engine waits for the last: that time is the round's turn-around. `Shortcut`
serves POST /v1/chat/completions, /v1/completions and /v1/embeddings itself when the request is
what clients send (JSON that validates, a valid key): it calls the route's endpoint with the parsed
body, as the route would, and answers the endpoint's errors with the app's exception handlers; a
client that leaves cancels the endpoint. Anything else (a bad body, a missing key, another content
type) goes on to FastAPI's route with its body, so every error is the one FastAPI's route gives,
and the routes stay in the OpenAPI schema.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from inspect import isawaitable
from typing import Any

from fastapi import FastAPI, HTTPException
from pydantic import BaseModel, ValidationError
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from lmx.api.auth import require_inference
from lmx.api.deps import AppDeps

Endpoint = Callable[[Any, AppDeps], Awaitable[Response]]


@dataclass(frozen=True)
class _Way:
    route: Route  # what the router would put in the scope: the metrics label it by its path
    body: type[BaseModel]
    endpoint: Endpoint


class Shortcut:
    """Plain ASGI in front of FastAPI's router; `ways` maps a POST path to its body's model and
    endpoint. `api`'s exception handlers answer the endpoints' errors."""

    def __init__(
        self,
        app: ASGIApp,
        api: FastAPI,
        deps: AppDeps,
        ways: Mapping[str, tuple[type[BaseModel], Endpoint]],
    ) -> None:
        self.app = app
        self.api = api
        self.deps = deps
        self.ways = {
            path: _Way(Route(path, endpoint, methods=["POST"]), body, endpoint)
            for path, (body, endpoint) in ways.items()
        }

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        way = self.ways.get(scope["path"]) if scope["type"] == "http" else None
        if way is None or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        request = Request(scope, receive)
        if not is_json(request.headers.get("content-type")) or not self._allowed(request):
            await self.app(scope, receive, send)
            return
        try:
            raw = await request.body()
        except ClientDisconnect:
            return
        response: Response | None
        try:
            body = way.body.model_validate_json(raw)
        except ValidationError:
            await self.app(scope, _replay(raw, receive), send)
            return
        except Exception as exc:  # a check of the body's own that names its field (RequestError)
            response = await self._handled(request, exc)
        else:
            scope["route"] = way.route
            try:
                response = await self._answer(way, body, receive)
            except Exception as exc:
                response = await self._handled(request, exc)
        if response is not None:
            await response(scope, receive, send)

    async def _answer(self, way: _Way, body: BaseModel, receive: Receive) -> Response | None:
        """The endpoint's response, or None if the client left before it: a watcher cancels the
        endpoint then, so that a request answered only at its end (not streamed) stops
        generating when its client goes, as a stream does (lmx.api.v1.EventStream)."""
        answering = asyncio.current_task()
        assert answering is not None
        left = False

        async def watch() -> None:
            nonlocal left
            while (await receive())["type"] != "http.disconnect":
                pass
            left = True
            answering.cancel()

        watcher = asyncio.create_task(watch())
        try:
            return await way.endpoint(body, self.deps)
        except asyncio.CancelledError:
            if not left or answering.uncancel() > 0:
                raise  # not (only) the client leaving
            return None
        finally:
            watcher.cancel()

    def _allowed(self, request: Request) -> bool:
        try:
            require_inference(self.deps.keys, request)
        except HTTPException:
            return False  # the route's dependency answers it
        return True

    async def _handled(self, request: Request, exc: Exception) -> Response:
        """The app's handler for `exc`, as Starlette's ExceptionMiddleware picks it; anything it
        would not handle goes on up to the server-error handler."""
        handlers = self.api.exception_handlers
        for cls in type(exc).__mro__:
            if cls is Exception:
                break
            handler = handlers.get(cls)
            if handler is not None:
                response = handler(request, exc)
                return await response if isawaitable(response) else response
        raise exc


def is_json(content_type: str | None) -> bool:
    """Whether a body of `content_type` is JSON, as FastAPI's routes read it (`application/json`,
    `application/x+json`, ...): one the shortcut left to them was answered without its watch
    for the client leaving, and generated on to its end."""
    if content_type is None:
        return False
    subtype = content_type.partition(";")[0].strip().lower().partition("/")[2]
    return subtype == "json" or subtype.endswith("+json")


def _replay(raw: bytes, receive: Receive) -> Receive:
    """`receive` with the body it already gave handed out again first."""
    given = False

    async def again() -> Message:
        nonlocal given
        if given:
            return await receive()
        given = True
        return {"type": "http.request", "body": raw, "more_body": False}

    return again
