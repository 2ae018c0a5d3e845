"""The OpenAI error envelope: every error response from lmx is `{"error": {message, type, param, code}}`,
except on Anthropic's routes (/v1/messages...): `{"type": "error", "error": {type, message}}`, whose
clients read that one.

Routes raise `LmxError`s and never build error responses themselves; `unexpected` answers anything
else (lmx.api.app.RequestContext calls it, inside the other middlewares, so that such a response
still carries its request id and CORS headers and is counted).
"""

from __future__ import annotations

from typing import Any

import structlog
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from lmx.api.schemas import param_of
from lmx.api.shortcut import is_json
from lmx.errors import (
    ConfigError,
    GenerationFailed,
    LmxError,
    ModelNotFound,
    PermanentError,
    QueueFull,
    RequestError,
    ResponseNotFound,
    TemporaryError,
)
from lmx.reconciler.editing import EditConflict, PreconditionFailed

log = structlog.get_logger(__name__)


# Anthropic's error types by status; any other 4xx is an invalid_request_error (as Anthropic
# says it may answer one: a model that cannot fit is a 409), any other status an api_error.
_ANTHROPIC_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",
}
ANTHROPIC_ROUTES = "/v1/messages"  # and those under it


def envelope(
    status: int,
    message: str,
    *,
    type_: str,
    param: str | None = None,
    code: str | None = None,
    headers: dict[str, str] | None = None,
    errors: list[str] | None = None,
    path: str = "",
) -> JSONResponse:
    """The OpenAI error envelope, or Anthropic's for a request to `path` under its routes (which
    has no param or code: the message names the field); `errors` (one line per problem, each
    naming its field) rides along for an invalid desired state, whose `message` joins them."""
    if path.startswith(ANTHROPIC_ROUTES):
        if param is not None and param not in message:
            message = f"{param}: {message}"
        other = "invalid_request_error" if 400 <= status < 500 else "api_error"
        error = {"type": _ANTHROPIC_TYPES.get(status, other), "message": message}
        return JSONResponse({"type": "error", "error": error}, status_code=status, headers=headers)
    body: dict[str, Any] = {"message": message, "type": type_, "param": param, "code": code}
    if errors is not None:
        body["errors"] = errors
    return JSONResponse({"error": body}, status_code=status, headers=headers)


def _status_of(exc: LmxError) -> tuple[int, str, str | None, str | None]:
    """HTTP status, OpenAI error type, param, code."""
    match exc:
        case PreconditionFailed():
            return 412, "invalid_request_error", "If-Match", "precondition_failed"
        case EditConflict():
            return 409, "invalid_request_error", None, None
        case ModelNotFound():
            return 404, "invalid_request_error", "model", "model_not_found"
        case ResponseNotFound():
            return 404, "invalid_request_error", "response_id", "not_found"
        case RequestError():
            return 400, "invalid_request_error", exc.param, exc.code
        case ConfigError():
            # "models.a.want (line 4): ..." -> param "models.a.want"
            first = exc.errors[0].split(":")[0].split(" (")[0] if exc.errors else None
            param = None if first in (None, "(root)") or first.startswith("line ") else first
            return 422, "invalid_request_error", param, "invalid_desired_state"
        case GenerationFailed():
            return 500, "server_error", None, "generation_failed"
        case QueueFull():
            # OpenAI's answer to a request-rate limit, which clients already know to retry.
            return 429, "requests", None, "rate_limit_exceeded"
        case TemporaryError():
            return 503, "server_error", None, "unavailable"
        case PermanentError():
            return 409, "invalid_request_error", None, exc.code
        case _:
            return 500, "server_error", None, None


def _problem(error: dict[str, Any]) -> tuple[str | None, str]:
    """A validation error's param and its line of the message."""
    loc = tuple(error.get("loc", ()))
    if error.get("type") == "json_invalid":  # its loc is ("body", character): no param
        why = error.get("ctx", {}).get("error")
        at = f" at character {loc[-1]}" if len(loc) > 1 else ""
        return None, f"body: not valid JSON{at}" + (f" ({why})" if why else "")
    param = param_of(loc)
    return param, f"{param or 'body'}: {error.get('msg', '')}"


def install(app: FastAPI) -> None:
    @app.exception_handler(LmxError)
    async def _lmx(request: Request, exc: LmxError) -> JSONResponse:
        status, type_, param, code = _status_of(exc)
        headers = None
        if isinstance(exc, TemporaryError):
            headers = {"Retry-After": str(max(1, round(exc.delay_s)))}
        errors = exc.errors if isinstance(exc, ConfigError) else None
        return envelope(
            status,
            str(exc),
            type_=type_,
            param=param,
            code=code,
            headers=headers,
            errors=errors,
            path=request.url.path,
        )

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = [_problem(e) for e in exc.errors()] or [(None, "body: invalid request")]
        msg = "; ".join(line for _, line in problems)
        whole_body = any(tuple(e.get("loc", ())) == ("body",) for e in exc.errors())
        if whole_body and not is_json(request.headers.get("content-type")):
            msg += " (send it as JSON, with the header content-type: application/json)"
        return envelope(
            400,
            msg,
            type_="invalid_request_error",
            param=problems[0][0],
            code="invalid_value",
            path=request.url.path,
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        type_ = "invalid_request_error" if exc.status_code < 500 else "server_error"
        code = "invalid_api_key" if exc.status_code == 401 else None
        message = str(exc.detail)
        if exc.status_code in (404, 405) and message in ("Not Found", "Method Not Allowed"):
            # No route (or not this method): named as OpenAI names it, so a client that sent a
            # request lmx does not serve (say /v1/audio/speech) sees which one.
            message = f"Invalid URL ({request.method} {request.url.path})"
        return envelope(
            exc.status_code,
            message,
            type_=type_,
            code=code,
            headers=dict(exc.headers or {}),
            path=request.url.path,
        )


def unexpected(exc: Exception, path: str) -> JSONResponse:
    """The 500 for an error no handler took in a request to `path`: logged with its traceback,
    named by its type."""
    log.exception("unhandled_error", error=repr(exc))
    return envelope(500, "internal error: " + type(exc).__name__, type_="server_error", path=path)
