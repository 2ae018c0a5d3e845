"""The planner, table-tested: plan(desired, observed) is pure, so each case is one line of each."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from lmx.reconciler.actions import BlockReason, Load, UnloadReason, plan_json
from lmx.reconciler.observed import ObservedModel
from lmx.reconciler.planning import plan
from lmx.reconciler.spec import Want
from tests.unit.planning_cases import (
    NOW,
    TOTAL,
    GiB,
    blocked,
    desired,
    loaded,
    on_disk,
    state,
    summary,
)

R: dict[str, Any] = {"want": "resident"}
P: dict[str, Any] = {"want": "pinned"}
D: dict[str, Any] = {"want": "downloaded"}
A: dict[str, Any] = {"want": "absent"}

# (id, desired, observed models, state kwargs, expected actions, expected blocked)
CASES: list[
    tuple[str, Any, list[ObservedModel], dict[str, Any], list[tuple[str, ...]], list[Any]]
] = [
    ("nothing_declared_nothing_to_do", desired(), [], {}, [], []),
    (
        "loads_a_resident_model_that_fits",
        desired(a=R),
        [on_disk("a", 2)],
        {},
        [("Load", "a")],
        [],
    ),
    ("loads_a_pinned_model", desired(a=P), [on_disk("a", 2)], {}, [("Load", "a")], []),
    (
        "downloads_a_declared_model_missing_from_disk",
        desired(a=R),
        [ObservedModel("a")],
        {},
        [("Download", "a")],
        [],
    ),
    (
        "downloads_a_downloaded_model_but_does_not_load_it",
        desired(a=D),
        [ObservedModel("a", footprint_bytes=GiB)],
        {},
        [("Download", "a")],
        [],
    ),
    ("leaves_an_unrequested_downloaded_model_on_disk", desired(a=D), [on_disk("a", 1)], {}, [], []),
    (
        "loads_a_downloaded_model_on_request_when_jit_is_on",
        desired(a=D),
        [on_disk("a", 1, requested=True)],
        {},
        [("Load", "a")],
        [],
    ),
    (
        "blocks_a_request_for_a_downloaded_model_when_jit_is_off",
        desired(jit=False, a=D),
        [on_disk("a", 1, requested=True)],
        {},
        [],
        [("a", "JitDisabled")],
    ),
    (
        "unloads_a_model_whose_want_became_absent",
        desired(a=A),
        [loaded("a", 1)],
        {},
        [("Unload", "a", "WantAbsent")],
        [],
    ),
    (
        "unloads_an_engine_no_longer_declared",
        desired(),
        [loaded("gone", 1)],
        {},
        [("Unload", "gone", "NotDeclared")],
        [],
    ),
    (
        "cancels_the_download_of_a_model_no_longer_declared",
        desired(),
        [ObservedModel("gone", downloading=True)],
        {},
        [("CancelDownload", "gone")],
        [],
    ),
    (
        "cancels_the_download_of_an_absent_model",
        desired(a=A),
        [ObservedModel("a", downloading=True)],
        {},
        [("CancelDownload", "a")],
        [],
    ),
    (
        "deletes_an_absent_model_with_prune",
        desired(a={**A, "prune": True}),
        [ObservedModel("a", on_disk=True)],
        {},
        [("Delete", "a")],
        [],
    ),
    (
        "keeps_files_another_declared_model_uses",
        desired(a={**A, "prune": True}, b={**R, "source": "org/a"}),
        [ObservedModel("a", on_disk=True), on_disk("b", 1)],
        {},
        [("Load", "b")],
        [],
    ),
    (
        # Another revision of the repo is in a directory of its own: no reason to keep these.
        "deletes_files_that_only_another_revision_of_the_repo_shares_a_name_with",
        desired(a={**A, "prune": True}, b={**R, "source": "org/a", "revision": "0" * 40}),
        [ObservedModel("a", on_disk=True), on_disk("b", 1)],
        {},
        [("Delete", "a"), ("Load", "b")],
        [],
    ),
    (
        "never_deletes_a_local_directory",
        desired(a={**A, "prune": True, "source": "/models/a"}),
        [ObservedModel("a", on_disk=True)],
        {},
        [],
        [],
    ),
    (
        "reports_a_missing_local_directory",
        desired(a={"source": "/models/a"}),
        [ObservedModel("a", source_missing=True)],
        {},
        [],
        [("a", "SourceMissing")],
    ),
    (
        "does_not_download_twice",
        desired(a=R),
        [ObservedModel("a", downloading=True)],
        {},
        [],
        [],
    ),
    (
        "counts_a_loading_model_against_the_budget",
        desired("4GiB", a=R, b=R),
        [dataclasses.replace(on_disk("a", 3), loading=True), on_disk("b", 2)],
        {},
        [],
        [("b", "InsufficientMemory")],
    ),
    # -- budget arithmetic --
    (
        "admits_a_load_that_fills_the_budget_exactly",
        desired(8 * GiB, a=R, b=R),
        [loaded("a", 5), on_disk("b", 3)],
        {},
        [("Load", "b")],
        [],
    ),
    (
        "refuses_a_load_one_byte_over_the_budget",
        desired(8 * GiB - 1, a=R, b=R),
        [loaded("a", 5), on_disk("b", 3)],
        {},
        [],
        [("b", "InsufficientMemory")],
    ),
    (
        "refuses_to_download_a_model_bigger_than_the_budget",
        desired("4GiB", a=R),
        [ObservedModel("a", footprint_bytes=5 * GiB)],
        {},
        [],
        [("a", "ExceedsBudget")],
    ),
    (
        "blocks_the_pin_that_takes_the_pins_over_the_budget",
        desired("5GiB", a=P, b=P),
        [on_disk("a", 3), on_disk("b", 3)],
        {},
        [("Load", "a")],
        [("b", "PinsExceedBudget")],
    ),
    (
        "reads_a_percentage_budget_of_total_memory",
        desired("5%", a=R, b=R),
        [on_disk("a", 3), on_disk("b", 2.1)],
        {},
        [("Load", "a")],
        [("b", "InsufficientMemory")],
    ),
    (
        "waits_for_memory_an_unload_has_not_returned_yet",
        desired("4GiB", a=R),
        [on_disk("a", 3)],
        {"unreleased_bytes": 2 * GiB, "releasing": True},
        [],
        [("a", "MemoryNotReleased")],
    ),
    (
        "counts_memory_that_never_came_back_as_used",
        desired("4GiB", a=R),
        [on_disk("a", 3)],
        {"unreleased_bytes": 2 * GiB, "releasing": False},
        [],
        [("a", "InsufficientMemory")],
    ),
    (
        "charges_an_engine_that_grew_past_its_footprint_by_its_real_size",
        desired("6GiB", a=R, b=R),
        [dataclasses.replace(loaded("a", 2), resident_bytes=4 * GiB), on_disk("b", 2.5)],
        {},
        [],
        [("b", "InsufficientMemory")],
    ),
    # -- eviction --
    (
        "evicts_the_least_recently_used_model_for_a_request",
        desired("6GiB", a=R, b=R, c=D),
        [loaded("a", 2, used=10), loaded("b", 2, used=500), on_disk("c", 3, requested=True)],
        {},
        [("Evict", "b", "for:c"), ("Load", "c")],
        [],
    ),
    (
        "evicts_several_models_oldest_first_when_one_is_not_enough",
        desired("6GiB", a=R, b=R, c=D),
        [loaded("a", 2, used=10), loaded("b", 2, used=500), on_disk("c", 5, requested=True)],
        {},
        [("Evict", "b", "for:c"), ("Evict", "a", "for:c"), ("Load", "c")],
        [],
    ),
    (
        "spares_a_small_old_model_when_a_larger_victim_frees_enough",
        desired("7GiB", a=R, b=R, c=D),
        [loaded("a", 1, used=900), loaded("b", 5, used=100), on_disk("c", 6, requested=True)],
        {},
        [("Evict", "b", "for:c"), ("Load", "c")],
        [],
    ),
    (
        "evicts_idle_models_before_busy_ones",
        desired("6GiB", a=R, b=R, c=D),
        [
            loaded("a", 2, used=10),
            loaded("b", 2, used=900, in_flight=1),
            on_disk("c", 3, requested=True),
        ],
        {},
        [("Evict", "a", "for:c"), ("Load", "c")],
        [],
    ),
    (
        # The pin stays; what cannot fit beside it is refused for good, not "retry later".
        "never_evicts_a_pinned_model",
        desired("4GiB", a=P, c=D),
        [loaded("a", 3, used=900), on_disk("c", 2, requested=True)],
        {},
        [],
        [("c", "ExceedsBudget")],
    ),
    (
        "downloads_nothing_that_cannot_fit_beside_the_pins",
        desired("4GiB", a=P, c=D),
        [loaded("a", 3), ObservedModel("c", footprint_bytes=2 * GiB)],
        {},
        [],
        [("c", "ExceedsBudget")],
    ),
    (
        # Its engine leaves (drained; its files were deleted under it), so that engine's bytes
        # do not stay: what fits beside the pin is what fits beside its next engine.
        "downloads_what_fits_beside_a_pin_whose_engine_leaves",
        desired("4GiB", a=P, c=D),
        [
            ObservedModel("a", resident=True, resident_bytes=3 * GiB, draining=True),
            ObservedModel("c", footprint_bytes=2 * GiB),
        ],
        {},
        [("Unload", "a", "Drained"), ("Download", "a"), ("Download", "c")],
        [],
    ),
    (
        "a_pin_evicts_a_resident_model",
        desired("4GiB", a=R, p=P),
        [loaded("a", 3), on_disk("p", 2)],
        {},
        [("Evict", "a", "for:p"), ("Load", "p")],
        [],
    ),
    (
        "a_resident_model_takes_free_room_only",
        desired("4GiB", a=R, b=R),
        [loaded("a", 3, used=900), on_disk("b", 2)],
        {},
        [],
        [("b", "InsufficientMemory")],
    ),
    (
        "drains_a_busy_victim_instead_of_cutting_it",
        desired("4GiB", a=R, c=D),
        [loaded("a", 3, in_flight=2), on_disk("c", 2, requested=True)],
        {},
        [("Drain", "a")],
        [("a", "Draining"), ("c", "WaitingForDrain")],
    ),
    (
        "unloads_a_drained_model_and_loads_the_request_in_its_room",
        desired("4GiB", a=R, c=D),
        [loaded("a", 3, draining=True, drain_deadline_s=NOW + 30), on_disk("c", 2, requested=True)],
        {},
        [("Unload", "a", "Drained"), ("Load", "c")],
        [("a", "InsufficientMemory")],
    ),
    (
        # A request for the model evicted for an earlier one waits its turn: the room goes to the
        # request that came first, and the evicted model is not loaded straight back.
        "gives_the_room_a_drain_freed_to_the_request_that_came_first",
        desired("4GiB", a=D, c=D),
        [
            loaded(
                "a", 3, draining=True, drain_deadline_s=NOW + 30, requested=True, request_order=2
            ),
            on_disk("c", 2, requested=True, request_order=1),
        ],
        {},
        [("Unload", "a", "Drained"), ("Load", "c")],
        [("a", "WaitingForTurn")],
    ),
    (
        # The later request is not refused: the first model may be evicted once it has served.
        "loads_requested_models_first_come_first_served",
        desired("4GiB", a=D, b=D),
        [
            on_disk("a", 3, requested=True, request_order=7),
            on_disk("b", 3, requested=True, request_order=4),
        ],
        {},
        [("Load", "b")],
        [("a", "WaitingForTurn")],
    ),
    (
        "a_request_waits_for_the_room_of_a_load_under_way",
        desired("4GiB", a=D, b=D),
        [dataclasses.replace(on_disk("a", 3), loading=True), on_disk("b", 3, requested=True)],
        {},
        [],
        [("b", "WaitingForTurn")],
    ),
    (
        "a_request_waits_for_a_model_loaded_for_a_request_ahead_of_it",
        desired("4GiB", a=D, b=D, c=D),
        [
            loaded("a", 2, requested=True, request_order=1),
            on_disk("b", 1, requested=True, request_order=2),
            on_disk("c", 2, requested=True, request_order=3),
        ],
        {},
        [("Load", "b")],
        [("c", "WaitingForTurn")],
    ),
    (
        # A loading pin stays: no turn comes.
        "refuses_a_request_for_the_room_a_loading_pin_takes",
        desired("4GiB", p=P, c=D),
        [dataclasses.replace(on_disk("p", 1), loading=True), on_disk("c", 2, requested=True)],
        {"unreleased_bytes": 3 * GiB // 2},
        [],
        [("c", "InsufficientMemory")],
    ),
    (
        "waits_for_a_draining_model_before_its_deadline",
        desired("4GiB", a=R, c=D),
        [
            loaded("a", 3, in_flight=1, draining=True, drain_deadline_s=NOW + 30),
            on_disk("c", 2, requested=True),
        ],
        {},
        [],
        [("a", "Draining"), ("c", "WaitingForDrain")],
    ),
    (
        "unloads_a_busy_draining_model_at_its_deadline",
        desired("4GiB", a=R, c=D),
        [
            loaded("a", 3, in_flight=1, draining=True, drain_deadline_s=NOW),
            on_disk("c", 2, requested=True),
        ],
        {},
        [("Unload", "a", "Drained", "forced"), ("Load", "c")],
        [("a", "InsufficientMemory")],
    ),
    (
        # Its spec changed, then changed back: it is loaded as its spec says, so it serves on.
        "calls_off_a_drain_whose_change_was_undone",
        desired("4GiB", a=R),
        [
            loaded(
                "a",
                3,
                in_flight=1,
                draining=True,
                drain_deadline_s=NOW + 30,
                drain_reason=UnloadReason.SPEC_CHANGED,
            )
        ],
        {},
        [("Resume", "a")],
        [],
    ),
    (
        "goes_on_with_a_drain_whose_cause_holds",
        desired("4GiB", a={**R, "want": "absent"}),
        [
            loaded(
                "a",
                3,
                in_flight=1,
                draining=True,
                drain_deadline_s=NOW + 30,
                drain_reason=UnloadReason.NOT_DECLARED,
            )
        ],
        {},
        [],
        [("a", "Draining")],
    ),
    (
        # The room went to another model, which may have loaded in it.
        "finishes_an_evictions_drain",
        desired("4GiB", a=R),
        [
            loaded(
                "a", 3, draining=True, drain_deadline_s=NOW + 30, drain_reason=UnloadReason.EVICTED
            )
        ],
        {},
        [("Unload", "a", "Drained"), ("Load", "a")],
        [],
    ),
    # -- idle TTL, spec changes --
    (
        "unloads_a_resident_model_idle_past_its_ttl",
        desired(a={**R, "idle_ttl": "10m"}),
        [loaded("a", 1, used=601)],
        {},
        [("Unload", "a", "IdleTimeout")],
        [],
    ),
    (
        "keeps_a_pinned_model_whatever_its_idle_ttl",
        desired(a={**P, "idle_ttl": "10m"}),
        [loaded("a", 1, used=6_000)],
        {},
        [],
        [],
    ),
    (
        "keeps_a_busy_model_past_its_ttl",
        desired(a={**R, "idle_ttl": "10m"}),
        [loaded("a", 1, used=601, in_flight=1)],
        {},
        [],
        [],
    ),
    # A request's ttl (LM Studio's): for a model loaded on demand whose spec sets none.
    (
        "unloads_a_model_loaded_on_demand_idle_past_its_requests_ttl",
        desired(a=D),
        [loaded("a", 1, used=301, request_ttl_s=300.0)],
        {},
        [("Unload", "a", "IdleTimeout")],
        [],
    ),
    (
        "keeps_a_model_loaded_on_demand_within_its_requests_ttl",
        desired(a=D),
        [loaded("a", 1, used=299, request_ttl_s=300.0)],
        {},
        [],
        [],
    ),
    (
        "takes_the_specs_idle_ttl_over_a_requests",
        desired(a={**D, "idle_ttl": "1h"}),
        [loaded("a", 1, used=301, request_ttl_s=300.0)],
        {},
        [],
        [],
    ),
    (
        "keeps_a_resident_model_whatever_ttl_a_request_asked_for",
        desired(a=R),
        [loaded("a", 1, used=6_000, request_ttl_s=300.0)],
        {},
        [],
        [],
    ),
    (
        "does_not_reload_a_resident_model_that_idled_out",
        desired(a=R),
        [on_disk("a", 1, idled=True)],
        {},
        [],
        [],
    ),
    (
        "reloads_an_idled_resident_model_on_request_even_with_jit_off",
        desired(jit=False, a=R),
        [on_disk("a", 1, idled=True, requested=True)],
        {},
        [("Load", "a")],
        [],
    ),
    (
        "unloads_a_model_demoted_from_resident_to_downloaded",
        desired(a=D),
        [loaded("a", 1, loaded_want="resident")],
        {},
        [("Unload", "a", "Demoted")],
        [],
    ),
    (
        "keeps_a_downloaded_model_loaded_on_request",
        desired(a=D),
        [loaded("a", 1, loaded_want="downloaded")],
        {},
        [],
        [],
    ),
    # -- failures --
    (
        "holds_back_a_quarantined_model",
        desired(a=R),
        [on_disk("a", 1, quarantine_reason="LoadFailed: boom")],
        {},
        [],
        [("a", "Quarantined")],
    ),
    (
        "holds_back_a_model_backing_off",
        desired(a=R),
        [on_disk("a", 1, retry_at_s=NOW + 5)],
        {},
        [],
        [("a", "BackingOff")],
    ),
    (
        "retries_once_the_backoff_has_passed",
        desired(a=R),
        [on_disk("a", 1, retry_at_s=NOW)],
        {},
        [("Load", "a")],
        [],
    ),
    (
        "holds_back_a_download_backing_off",
        desired(a=R),
        [ObservedModel("a", retry_at_s=NOW + 5)],
        {},
        [],
        [("a", "BackingOff")],
    ),
    (
        "reports_a_downloaded_model_with_no_size_estimate",
        desired(a=R),
        [ObservedModel("a", downloaded=True)],
        {},
        [],
        [("a", "FootprintUnknown")],
    ),
    # -- order --
    (
        "orders_frees_before_downloads_before_loads_and_pins_first",
        desired("10GiB", gone=A, r=R, p=P, q=D, n=R),
        [loaded("gone", 1), on_disk("r", 1), on_disk("p", 1), on_disk("q", 1, requested=True)],
        {},
        [
            ("Unload", "gone", "WantAbsent"),
            ("Download", "n"),
            ("Load", "p"),
            ("Load", "q"),
            ("Load", "r"),
        ],
        [],
    ),
]


@pytest.mark.parametrize(
    ("d", "models", "kw", "actions", "blocks"),
    [
        pytest.param(*c[1:], id=c[0])
        for c in CASES
        if c[0] != "reloads_a_model_whose_load_parameters_changed"
    ],
)
def test_plan(
    d: Any,
    models: list[ObservedModel],
    kw: dict[str, Any],
    actions: list[tuple[str, ...]],
    blocks: list[tuple[str, str]],
) -> None:
    p = plan(d, state(d, *models, **kw))
    assert summary(p) == actions
    assert blocked(p) == blocks


def test_reloads_a_model_whose_load_parameters_changed() -> None:
    old = desired(a=R)
    new = desired(a={**R, "engine": {"max_batch": 4}})
    observed = state(old, loaded("a", 1))
    p = plan(new, observed)
    assert summary(p) == [("Unload", "a", "SpecChanged"), ("Load", "a")]


def test_changes_outside_the_load_parameters_touch_nothing() -> None:
    old = desired(a={**P, "aliases": ["x"]}, b=R)
    new = desired(a={**R, "aliases": ["y"], "idle_ttl": "1h"}, b=R)
    p = plan(new, state(old, loaded("a", 1), loaded("b", 1)))
    assert p.is_empty and not p.blocked


def test_the_plan_of_a_converged_state_is_empty() -> None:
    d = desired("10GiB", p=P, r=R, q=D)
    p = plan(d, state(d, loaded("p", 2), loaded("r", 2), on_disk("q", 2)))
    assert p.actions == () and p.blocked == ()


def test_requeues_at_the_earliest_idle_ttl() -> None:
    d = desired(a={**R, "idle_ttl": "10m"}, b={**R, "idle_ttl": "1h"})
    p = plan(d, state(d, loaded("a", 1, used=100), loaded("b", 1, used=100)))
    assert p.is_empty
    assert p.requeue_after_s == pytest.approx(500)


def test_requeues_when_a_requests_ttl_runs_out() -> None:
    d = desired(a=D, b=R)
    models = (loaded("a", 1, used=100, request_ttl_s=300.0), loaded("b", 1, request_ttl_s=60.0))
    p = plan(d, state(d, *models))
    assert p.is_empty and p.requeue_after_s == pytest.approx(200)


def test_requeues_a_busy_model_with_a_ttl_a_ttl_from_now() -> None:
    # The earliest it can idle out: were its requests to end now. Their end wakes no pass.
    d = desired(a=D, b={**R, "idle_ttl": "10m"})
    models = (
        loaded("a", 1, used=100, in_flight=1, request_ttl_s=2.0),
        loaded("b", 1, used=700, in_flight=2),
    )
    p = plan(d, state(d, *models))
    assert p.is_empty and p.requeue_after_s == pytest.approx(2)
    d = desired(b={**R, "idle_ttl": "10m"})
    p = plan(d, state(d, models[1]))
    assert p.is_empty and p.requeue_after_s == pytest.approx(600)


def test_requeues_at_the_end_of_a_backoff_and_of_a_drain() -> None:
    d = desired("4GiB", a=R, b=R, c=D)
    p = plan(
        d,
        state(
            d,
            loaded("a", 3, in_flight=1, draining=True, drain_deadline_s=NOW + 30),
            on_disk("b", 1, retry_at_s=NOW + 7),
            on_disk("c", 1, requested=True),
        ),
    )
    assert p.requeue_after_s == pytest.approx(7)


def test_budget_and_charge_are_reported() -> None:
    d = desired("10GiB", a=R, b=R)
    p = plan(d, state(d, loaded("a", 2), on_disk("b", 3)))
    assert p.budget_bytes == 10 * GiB
    assert p.used_bytes == 5 * GiB
    assert [a for a in p.actions if isinstance(a, Load)] == [Load("b", 3 * GiB, Want.RESIDENT)]


def test_blocked_messages_name_the_sizes() -> None:
    d = desired("4GiB", a=R)
    p = plan(d, state(d, ObservedModel("a", footprint_bytes=5 * GiB)))
    assert p.blocked[0].reason is BlockReason.EXCEEDS_BUDGET
    assert p.blocked[0].message == "needs 5.0 GiB, the whole budget is 4.0 GiB"


def test_a_refusal_names_the_room_promised_to_the_models_ahead() -> None:
    d = desired("4GiB", a=D, c=D)
    loading = dataclasses.replace(on_disk("a", 1), loading=True)
    o = state(d, loading, on_disk("c", 2, requested=True), unreleased_bytes=5 * GiB // 2)
    (b,) = plan(d, o).blocked
    assert (b.reason, b.message) == (
        BlockReason.INSUFFICIENT_MEMORY,
        "needs 2.0 GiB, 512.0 MiB free; it lacks 1.5 GiB: evicting could free 0 B, and the models"
        " loading or requested ahead of it 1.0 GiB once served (pinned models and memory an"
        " unload did not return stay)",
    )
    o = state(d, loading, on_disk("c", 2, requested=True), unreleased_bytes=2 * GiB)
    (b,) = plan(d, o).blocked
    assert (b.reason, b.message) == (
        BlockReason.WAITING_FOR_TURN,
        "needs 2.0 GiB, 1.0 GiB free; 1.0 GiB is promised to models loading or requested ahead"
        " of it, each evictable once loaded and served",
    )


def test_plan_json_is_plain_data() -> None:
    d = desired("6GiB", a=R, c=D)
    p = plan(d, state(d, loaded("a", 3, in_flight=1), on_disk("c", 4, requested=True)))
    doc = plan_json(p)
    assert doc["actions"] == [
        {"action": "Drain", "model": "a", "reason": "Evicted", "for_model": "c"}
    ]
    assert doc["blocked"][1] == {
        "model": "c",
        "reason": "WaitingForDrain",
        "message": "needs 4.0 GiB, 3.0 GiB free; draining busy models",
    }
    assert doc["budget_bytes"] == 6 * GiB
    # A load on request says so, whatever the model's own want.
    p = plan(d, state(d, loaded("a", 1), on_disk("c", 2, requested=True)))
    assert plan_json(p)["actions"] == [
        {"action": "Load", "model": "c", "footprint_bytes": 2 * GiB, "why": "request"}
    ]


def test_total_memory_is_the_base_of_a_percentage_budget() -> None:
    d = desired("50%")
    assert plan(d, state(d)).budget_bytes == TOTAL // 2
