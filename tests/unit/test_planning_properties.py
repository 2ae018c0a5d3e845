"""Properties of the planner over generated states: executing a plan converges in one step, and
no plan cuts a busy model, evicts a pin, or admits a load over the budget."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from lmx.reconciler.actions import Evict, Load, Unload
from lmx.reconciler.observed import ObservedModel, ObservedState
from lmx.reconciler.planning import plan
from lmx.reconciler.spec import DesiredState, Want
from tests.unit.planning_cases import NOW, GiB, desired, execute, state

IDS = ["a", "b", "c", "d", "e"]


@st.composite
def specs(draw: st.DrawFn) -> dict[str, Any]:
    spec: dict[str, Any] = {"want": draw(st.sampled_from([w.value for w in Want]))}
    if draw(st.booleans()):
        spec["idle_ttl"] = draw(st.sampled_from(["1m", "10m"]))
    if draw(st.booleans()):
        spec["engine"] = {"max_batch": draw(st.sampled_from([1, 4]))}
    spec["prune"] = draw(st.booleans())
    return spec


@st.composite
def worlds(draw: st.DrawFn) -> tuple[DesiredState, ObservedState]:
    declared = draw(st.lists(st.sampled_from(IDS), unique=True, max_size=5))
    d = desired(
        draw(st.sampled_from(["4GiB", "8GiB", "16GiB"])),
        jit=draw(st.booleans()),
        **{mid: draw(specs()) for mid in declared},
    )
    old = desired("4GiB", True, **{mid: {} for mid in declared})  # what engines were loaded with
    models = []
    for mid in draw(st.lists(st.sampled_from([*IDS, "x"]), unique=True, max_size=6)):
        fp = draw(st.sampled_from([1, 2, 3, 5])) * GiB
        resident = draw(st.booleans())
        draining = resident and draw(st.booleans())
        spec = d.models.get(mid)
        models.append(
            ObservedModel(
                mid,
                downloaded=draw(st.booleans()),
                downloading=not resident and draw(st.booleans()),
                on_disk=draw(st.booleans()),
                resident=resident,
                ready=resident and not draining,
                loaded_key=(
                    (spec if draw(st.booleans()) and spec else old.models.get(mid) or spec).load_key
                    if resident and spec
                    else None
                ),
                loaded_want=draw(st.sampled_from(list(Want))) if resident else None,
                resident_bytes=draw(st.sampled_from([0, fp // 2, fp])) if resident else 0,
                in_flight=draw(st.integers(0, 2)) if resident else 0,
                last_used_s=NOW - draw(st.integers(0, 1_000)),
                request_ttl_s=draw(st.sampled_from([None, 60.0, 600.0])) if resident else None,
                draining=draining,
                drain_deadline_s=NOW + draw(st.sampled_from([-1, 30])) if draining else None,
                footprint_bytes=draw(st.sampled_from([None, fp, fp])),
                requested=draw(st.booleans()),
                idled=draw(st.booleans()),
                quarantine_reason=draw(st.sampled_from([None, None, None, "LoadFailed: x"])),
                retry_at_s=draw(st.sampled_from([None, None, NOW - 1, NOW + 5])),
                source_missing=False,
            )
        )
    return d, state(d, *models)


@settings(max_examples=250, deadline=None)
@given(worlds())
def test_executing_the_plan_yields_a_state_whose_plan_is_empty(
    world: tuple[DesiredState, ObservedState],
) -> None:
    d, observed = world
    first = plan(d, observed)
    after = execute(d, observed, first.actions)
    second = plan(d, after)
    assert second.actions == (), (first.actions, second.actions)


@settings(max_examples=100, deadline=None)
@given(worlds())
def test_no_plan_cuts_a_busy_model_or_evicts_a_pin(
    world: tuple[DesiredState, ObservedState],
) -> None:
    d, observed = world
    for a in plan(d, observed).actions:
        o = observed.model(a.model_id)
        if isinstance(a, Evict):
            assert o.in_flight == 0
            assert d.models[a.model_id].want is not Want.PINNED
        if isinstance(a, Unload) and o.in_flight > 0:
            assert a.forced and o.drain_deadline_s is not None
            assert o.drain_deadline_s <= observed.now_s


@settings(max_examples=100, deadline=None)
@given(worlds())
def test_loads_are_admitted_within_the_budget(world: tuple[DesiredState, ObservedState]) -> None:
    d, observed = world
    p = plan(d, observed)
    if not any(isinstance(a, Load) for a in p.actions):
        return
    after = execute(d, observed, p.actions)
    charged = sum(m.charge_bytes for m in after.models.values() if m.resident or m.loading)
    assert charged + after.unreleased_bytes <= p.budget_bytes
