"""Bearer keys: an admin key for /admin (always for mutations), optional inference keys for /v1.

A key comes as `Authorization: Bearer <key>` or, as Anthropic's clients send it, `x-api-key`.
Keys are compared in constant time. Failures answer 401 with the OpenAI error envelope and a
`WWW-Authenticate: Bearer` challenge. The key sources are callables: inference keys live in the
desired state and change with it.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable
from dataclasses import dataclass, field

from fastapi import HTTPException, Request


@dataclass
class Keys:
    admin: Callable[[], str | None] = lambda: None
    inference: Callable[[], tuple[str, ...]] = field(default=lambda: ())
    # Binding beyond loopback: /admin reads need the admin key too.
    protect_admin_reads: bool = False


def _bearer(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return request.headers.get("x-api-key", "").strip() or None


def _matches(token: str | None, keys: tuple[str, ...]) -> bool:
    if token is None:
        return False
    # Compare with every key, so timing does not tell which one (or whether any) was close.
    hits = [hmac.compare_digest(token.encode(), k.encode()) for k in keys]
    return any(hits)


def _deny(token: str | None, what: str) -> HTTPException:
    why = "no API key was given" if token is None else "the API key is not valid"
    return HTTPException(
        status_code=401,
        detail=f"{why} for {what}; send 'Authorization: Bearer <key>' (or 'x-api-key: <key>')",
        headers={"WWW-Authenticate": "Bearer"},
    )


def has_admin_key(keys: Keys, request: Request) -> bool:
    """Whether the request carries the admin key (what decides if /admin shows secrets)."""
    admin = keys.admin()
    return admin is not None and _matches(_bearer(request), (admin,))


def require_admin(keys: Keys, request: Request, *, mutation: bool) -> None:
    if not mutation and not keys.protect_admin_reads:
        return
    admin = keys.admin()
    token = _bearer(request)
    if admin is None or not _matches(token, (admin,)):
        raise _deny(token, "/admin")


def require_inference(keys: Keys, request: Request) -> None:
    allowed = keys.inference()
    if not allowed:
        return
    admin = keys.admin()
    token = _bearer(request)
    if not _matches(token, (*allowed, *((admin,) if admin else ()))):
        raise _deny(token, request.url.path)  # /v1, LM Studio's /api, ...
