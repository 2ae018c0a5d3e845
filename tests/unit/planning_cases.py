"""Builders for planner tests: desired states and observed states in a line each."""

from __future__ import annotations

import dataclasses
from typing import Any

from lmx.reconciler.actions import (
    Action,
    CancelDownload,
    Delete,
    Download,
    Drain,
    Evict,
    Load,
    Plan,
    Unload,
    UnloadReason,
)
from lmx.reconciler.manifest import validate
from lmx.reconciler.observed import ObservedModel, ObservedState
from lmx.reconciler.spec import DesiredState, Want

GiB = 2**30
NOW = 1_000.0
TOTAL = 100 * GiB


def desired(
    budget: str | int = "10GiB", jit: bool = True, **models: dict[str, Any]
) -> DesiredState:
    """`desired(a={"want": "pinned"})`: every model defaults to a Hub source named after it."""
    specs = {mid: {"source": f"org/{mid}", **spec} for mid, spec in models.items()}
    return validate({"memory": {"budget": budget}, "jit": jit, "models": specs})


def on_disk(mid: str, gib: float, **kw: Any) -> ObservedModel:
    """Downloaded, not loaded, with a footprint of `gib` GiB."""
    return ObservedModel(mid, downloaded=True, footprint_bytes=int(gib * GiB), **kw)


def loaded(mid: str, gib: float, *, used: float = 0.0, **kw: Any) -> ObservedModel:
    """Downloaded and loaded and ready; `used` is its last use, seconds before NOW."""
    return ObservedModel(
        mid,
        downloaded=True,
        resident=True,
        ready=not kw.get("draining", False),
        footprint_bytes=int(gib * GiB),
        resident_bytes=int(gib * GiB * 0.9),
        last_used_s=NOW - used,
        **kw,
    )


def state(d: DesiredState, *models: ObservedModel, **kw: Any) -> ObservedState:
    """The observed state; loaded models get the load key and want of their current spec."""
    out = {}
    for o in models:
        spec = d.models.get(o.model_id)
        if o.resident and spec is not None and o.loaded_key is None:
            want = o.loaded_want or spec.want
            o = dataclasses.replace(o, loaded_key=spec.load_key, loaded_want=want)
        out[o.model_id] = o
    return ObservedState(now_s=kw.pop("now", NOW), total_memory_bytes=TOTAL, models=out, **kw)


def summary(p: Plan) -> list[tuple[str, ...]]:
    """("Load", "a"), ("Unload", "b", "IdleTimeout"), ("Evict", "c", "for:a"), ("Drain", "d")."""
    out: list[tuple[str, ...]] = []
    for a in p.actions:
        row: tuple[str, ...] = (type(a).__name__, a.model_id)
        match a:
            case Unload(reason=reason, forced=forced):
                row += (str(reason),) + (("forced",) if forced else ())
            case Evict(for_model=for_model):
                row += (f"for:{for_model}",)
        out.append(row)
    return out


def blocked(p: Plan) -> list[tuple[str, str]]:
    return [(b.model_id, str(b.reason)) for b in p.blocked]


def execute(d: DesiredState, o: ObservedState, actions: tuple[Action, ...]) -> ObservedState:
    """What a perfect executor leaves behind: the fake the property test plans against again."""
    models = dict(o.models)
    for a in actions:
        m = models.get(a.model_id) or ObservedModel(a.model_id)
        spec = d.models.get(a.model_id)
        match a:
            case Drain():
                m = dataclasses.replace(
                    m, draining=True, ready=False, drain_deadline_s=o.now_s + 60
                )
            case Unload() | Evict():
                idle = isinstance(a, Unload) and a.reason is UnloadReason.IDLE_TIMEOUT
                m = dataclasses.replace(
                    m,
                    resident=False,
                    ready=False,
                    draining=False,
                    drain_deadline_s=None,
                    in_flight=0,
                    resident_bytes=0,
                    loaded_key=None,
                    loaded_want=None,
                    request_ttl_s=None,
                    idled=m.idled or idle,
                )
            case CancelDownload():
                m = dataclasses.replace(m, downloading=False)
            case Delete():
                m = dataclasses.replace(m, on_disk=False)
            case Download():
                m = dataclasses.replace(m, downloading=True)
            case Load(why=why):
                assert spec is not None
                m = dataclasses.replace(
                    m,
                    resident=True,
                    ready=True,
                    loaded_key=spec.load_key,
                    loaded_want=Want.DOWNLOADED if why is Want.DOWNLOADED else spec.want,
                    last_used_s=o.now_s,
                    request_ttl_s=None,  # a new engine: no request has asked for one yet
                    idled=False,
                )
        models[a.model_id] = m
    return dataclasses.replace(o, models=models)
