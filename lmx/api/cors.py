"""CORS for browser clients (web chat UIs calling localhost:1234), from the desired state.

The allowed origins are read per request (`server.cors_origins` can change with a config edit),
so this is a small ASGI middleware of its own rather than Starlette's static CORSMiddleware.
/admin is left out whatever the origins: no web page may read the desired state or send a
mutation, even where `server.cors_origins` is "*".
"""

from __future__ import annotations

from collections.abc import Callable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

_ALLOW_METHODS = b"GET, POST, PUT, PATCH, DELETE, OPTIONS"
_MAX_AGE_S = b"600"


class DynamicCORS:
    def __init__(self, app: ASGIApp, origins: Callable[[], tuple[str, ...]]) -> None:
        self.app = app
        self.origins = origins

    def _allowed(self, origin: str) -> bool:
        allowed = self.origins()
        return "*" in allowed or origin in allowed

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = dict(scope["headers"]) if scope["type"] == "http" else {}
        origin = headers.get(b"origin", b"").decode("latin-1")
        if not origin or scope["path"].startswith("/admin") or not self._allowed(origin):
            await self.app(scope, receive, send)
            return
        allow = [(b"access-control-allow-origin", origin.encode()), (b"vary", b"Origin")]
        preflight = scope["method"] == "OPTIONS" and b"access-control-request-method" in headers
        if preflight:
            requested = headers.get(b"access-control-request-headers", b"")
            await send(
                {
                    "type": "http.response.start",
                    "status": 204,
                    "headers": [
                        *allow,
                        (b"access-control-allow-methods", _ALLOW_METHODS),
                        (b"access-control-allow-headers", requested or b"*"),
                        (b"access-control-max-age", _MAX_AGE_S),
                    ],
                }
            )
            await send({"type": "http.response.body", "body": b""})
            return

        async def send_with_cors(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *allow]
            await send(message)

        await self.app(scope, receive, send_with_cors)
