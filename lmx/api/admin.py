"""/admin: status, the desired state (GET with ETag, PATCH merge patch, PUT), plan, events.

Reads are open on loopback; every mutation needs the admin key. Mutations go through the
DesiredEditor (validated whole, written atomically, comments kept), never around it. Secrets
(`server.admin_key`, `server.api_keys`) are shown only to a GET that carries the admin key; every
other answer that echoes the desired state shows spec.REDACTED in their place, and the spec refuses
that marker as a key (422 naming the field), so a document read back and sent again never installs
it. The ETag is the file's, whichever way it is shown (so a redacted read may guard a PATCH), and
keyed by a secret of the daemon's, so that it tells nothing about the secrets it does not show.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Request
from fastapi.responses import JSONResponse, StreamingResponse

from lmx.api.auth import Keys, has_admin_key, require_admin
from lmx.api.chunks import KEEPALIVE, KEEPALIVE_S
from lmx.api.deps import AppDeps, Control
from lmx.api.schemas import ErrorEnvelope
from lmx.errors import ConfigError, RequestError
from lmx.reconciler.actions import plan_json
from lmx.reconciler.editing import EditResult
from lmx.reconciler.spec import redact

MERGE_PATCH = "application/merge-patch+json"
OPEN_TO_NETWORK = (
    "lmx listens beyond loopback and no server.api_keys are declared: anyone who can reach its"
    " port can use /v1; declare server.api_keys in the config file"
)


def open_to_network(keys: Keys) -> bool:
    """/v1 answers anyone who can reach the port: lmx listens beyond loopback (so /admin reads
    need the key too) and declares no inference key."""
    return keys.protect_admin_reads and not keys.inference()


def _deps(request: Request) -> AppDeps:
    deps: AppDeps = request.app.state.deps
    return deps


def _control(deps: AppDeps) -> Control:
    if deps.control is None:
        raise RequestError("this server has no desired state to manage")
    return deps.control


async def read_access(request: Request, deps: Annotated[AppDeps, Depends(_deps)]) -> Control:
    require_admin(deps.keys, request, mutation=False)
    return _control(deps)


async def write_access(request: Request, deps: Annotated[AppDeps, Depends(_deps)]) -> Control:
    require_admin(deps.keys, request, mutation=True)
    return _control(deps)


Reader = Annotated[Control, Depends(read_access)]
Writer = Annotated[Control, Depends(write_access)]
router = APIRouter(
    prefix="/admin",
    tags=["admin"],
    responses={code: {"model": ErrorEnvelope} for code in (401, 409, 412, 422)},
)


def _desired_response(control: Control, data: dict[str, Any], etag: str) -> JSONResponse:
    r = control.reconciler
    body = {
        "generation": r.generation,
        "observedGeneration": r.observed_generation,
        "valid": r.config_error is None,
        "error": r.config_error,
        "desired": data,
    }
    return JSONResponse(body, headers={"ETag": etag, "X-Lmx-Generation": str(r.generation)})


def _edit_response(control: Control, result: EditResult) -> JSONResponse:
    # The caller sent the change: its answer need not echo secrets (CLI --json output, logs).
    data = redact(result.data)
    if result.plan is not None:
        body = {"dry_run": True, "desired": data, "plan": plan_json(result.plan)}
        return JSONResponse(body, headers={"ETag": result.etag})
    return _desired_response(control, data, result.etag)


@router.get("/status")
async def status(control: Reader, deps: Annotated[AppDeps, Depends(_deps)]) -> dict[str, Any]:
    """Per-model conditions, footprints, in-flight and last use; memory; generations; config;
    warnings about how the daemon is exposed."""
    doc = control.reconciler.status()
    doc["warnings"] = [OPEN_TO_NETWORK] if open_to_network(deps.keys) else []
    return doc


@router.get("/desired", response_model=None)
async def get_desired(
    request: Request, control: Reader, deps: Annotated[AppDeps, Depends(_deps)]
) -> JSONResponse:
    """The desired state as the config file declares it, with its ETag and generation. Secrets
    show as "<redacted>" unless the request carries the admin key."""
    current = await asyncio.to_thread(control.editor.read)
    data = current.data if has_admin_key(deps.keys, request) else redact(current.data)
    return _desired_response(control, data, current.etag)


@router.patch("/desired", response_model=None)
async def patch_desired(
    request: Request,
    control: Writer,
    dry_run: bool = False,
    if_match: Annotated[str | None, Header()] = None,
) -> JSONResponse:
    """Apply a JSON merge patch (RFC 7396). 412 on a stale If-Match, 422 naming the field, 409
    while the config file is missing (or if it kept changing while written: retry)."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip()
    if ctype not in (MERGE_PATCH, "application/json"):
        raise RequestError(f"send the patch as {MERGE_PATCH}, not {ctype or 'no content type'}")
    try:
        patch = json.loads(await request.body())
    except json.JSONDecodeError as exc:
        raise ConfigError("PATCH /admin/desired", [f"(root): not JSON: {exc}"]) from None
    result = await control.editor.patch(patch, if_match=if_match, dry_run=dry_run)
    return _edit_response(control, result)


@router.put("/desired", response_model=None)
async def put_desired(
    request: Request,
    control: Writer,
    dry_run: bool = False,
    if_match: Annotated[str | None, Header()] = None,
) -> JSONResponse:
    """Replace the desired state with a whole YAML (or JSON) document, comments kept as sent."""
    text = (await request.body()).decode("utf-8", errors="replace")
    result = await control.editor.replace(text, if_match=if_match, dry_run=dry_run)
    return _edit_response(control, result)


@router.get("/plan")
async def get_plan(control: Reader) -> dict[str, Any]:
    """What the reconciler would do now, with a reason for each blocked item, and the config
    file's validity as /admin/status shows it: while the file is invalid, the plan is for the last
    good desired state, not for what the file says."""
    r = control.reconciler
    return {**r.plan_now_json(), "config": r.config_json()}


@router.get("/events", response_model=None)
async def events(
    control: Reader, last_event_id: Annotated[str | None, Header()] = None
) -> StreamingResponse:
    """Server-sent events: reconcile actions, condition changes, download progress. Each has an
    `id`; a client that reconnects with `Last-Event-ID` first gets what it missed. The stream
    ends when the daemon begins to stop."""
    after = None
    if last_event_id is not None:
        try:
            after = int(last_event_id)
        except ValueError:
            after = -1
        if after < 0:
            raise RequestError(
                f"Last-Event-ID must be an event id (a number, 0 or more), not {last_event_id!r}",
                param="Last-Event-ID",
            )
    sub = control.reconciler.subscribe(after)

    async def stream() -> AsyncIterator[bytes]:
        try:
            yield b": connected\n\n"
            while True:
                try:
                    async with asyncio.timeout(KEEPALIVE_S):
                        event = await anext(sub)
                except TimeoutError:
                    yield KEEPALIVE
                    continue
                except StopAsyncIteration:
                    return  # the daemon is stopping: end the response, do not hold it up
                kind = str(event.get("type", "message"))
                seq = f"id: {event['seq']}\n" if "seq" in event else ""
                yield f"{seq}event: {kind}\ndata: {json.dumps(event, default=str)}\n\n".encode()
        finally:
            sub.close()

    return StreamingResponse(
        stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
    )
