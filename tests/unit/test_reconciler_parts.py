"""Pure parts of the reconciler: memory arithmetic, backoff, conditions, the event bus, pins."""

from __future__ import annotations

import asyncio
import sys
import time

import pytest

from lmx.reconciler.actions import Blocked, BlockReason
from lmx.reconciler.admission import pins_over_budget
from lmx.reconciler.conditions import ConditionBook, ConditionType, derive
from lmx.reconciler.events import EventBus
from lmx.reconciler.failures import FailureBook
from lmx.reconciler.observed import ObservedModel
from lmx.reconciler.spec import ModelSpec
from lmx.runtime.memory import MemoryProbe, MemorySample, Usage, rise, shortfall
from tests.unit.planning_cases import GiB, desired

MiB = 2**20


def sample(active: int, rss: int) -> MemorySample:
    return MemorySample(64 * GiB, 32 * GiB, rss, active, 0)


def test_a_load_rise_discounts_what_other_engines_grew_meanwhile() -> None:
    u = rise(sample(1 * GiB, 2 * GiB), sample(3 * GiB, 5 * GiB), others_growth=GiB)
    assert u == Usage(mlx_bytes=GiB, rss_bytes=2 * GiB)
    assert u.bytes == 2 * GiB


def test_an_unload_that_returned_its_memory_has_no_shortfall() -> None:
    took = Usage(mlx_bytes=GiB, rss_bytes=GiB)
    assert shortfall(sample(3 * GiB, 4 * GiB), sample(2 * GiB, 3 * GiB), took) == 0


def test_rss_that_stays_up_after_mlx_freed_everything_is_a_shortfall() -> None:
    # What lmx measured on Linux before malloc_trim: MLX at 0, RSS unchanged.
    took = Usage(mlx_bytes=int(1.1 * GiB), rss_bytes=int(1.1 * GiB))
    missing = shortfall(sample(int(1.1 * GiB), int(1.8 * GiB)), sample(0, int(1.77 * GiB)), took)
    assert missing == pytest.approx(1.07 * GiB, rel=0.01)


def test_a_shortfall_within_the_slack_is_tolerated() -> None:
    took = Usage(mlx_bytes=GiB, rss_bytes=GiB)
    after = sample(0, 4 * GiB - int(0.81 * GiB))
    assert shortfall(sample(GiB, 4 * GiB), after, took) == 0  # 19% kept: allocator slack
    small = Usage(mlx_bytes=10 * MiB, rss_bytes=10 * MiB)
    assert shortfall(sample(GiB, GiB), sample(GiB, GiB), small) == 0  # under 64 MiB: noise


def test_other_engines_growing_during_an_unload_do_not_count_against_it() -> None:
    took = Usage(mlx_bytes=GiB, rss_bytes=GiB)
    assert (
        shortfall(sample(3 * GiB, 3 * GiB), sample(3 * GiB, 3 * GiB), took, others_growth=GiB) == 0
    )


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_malloc_trim_is_found_on_glibc_linux() -> None:
    probe = MemoryProbe()
    assert probe.can_trim
    probe.release(collect=True)
    s = probe.sample()
    assert s.total_bytes > 0 and s.rss_bytes > 0 and s.mlx_active_bytes == 0


def test_failures_back_off_exponentially_then_quarantine() -> None:
    book = FailureBook(max_failures=3, base_delay_s=1.0, max_delay_s=3.0)
    spec = ModelSpec(source="org/a")
    first = book.failed("a", spec, "LoadFailed", "x", now_s=100.0)
    assert (first.count, first.retry_at_s, first.quarantined) == (1, 101.0, False)
    second = book.failed("a", spec, "LoadFailed", "x", now_s=200.0, delay_s=0.5)
    assert second.retry_at_s == 202.0
    third = book.failed("a", spec, "LoadFailed", "x", now_s=300.0)
    assert third.quarantined and third.retry_at_s is None


def test_a_temporary_error_can_ask_for_a_longer_wait_than_the_backoff() -> None:
    book = FailureBook(base_delay_s=1.0)
    rec = book.failed("a", ModelSpec(source="org/a"), "Offline", "x", now_s=0.0, delay_s=30.0)
    assert rec.retry_at_s == 30.0


def test_a_permanent_error_quarantines_at_once_and_a_new_spec_starts_clean() -> None:
    book = FailureBook()
    spec = ModelSpec(source="org/a")
    assert book.failed("a", spec, "DownloadFailed", "404", now_s=0, permanent=True).quarantined
    assert book.current("a", spec) is not None
    assert book.current("a", spec.model_copy(update={"revision": "v2"})) is None
    # Changed back, the spec is tried again: what failed may have changed where lmx cannot see
    # (a token for a gated repo). It came back quarantined.
    assert book.current("a", spec) is None


def test_a_success_clears_only_failures_older_than_the_action_that_succeeded() -> None:
    book, spec = FailureBook(base_delay_s=1.0), ModelSpec(source="org/a")
    book.failed("a", spec, "EngineCrashed", "died", now_s=10.0)  # retry at 11
    book.succeeded("a", now_s=10.5)  # a load that began before the crash: the crash stands
    assert book.current("a", spec) is not None
    book.succeeded("a", now_s=12.0)  # the reload, after the backoff
    assert book.current("a", spec) is None
    book.failed("a", spec, "LoadFailed", "x", now_s=20.0, permanent=True)
    book.succeeded("a", now_s=1e9)
    assert book.current("a", spec) is not None  # quarantined until the spec changes


def test_conditions_of_a_model_waiting_for_memory() -> None:
    spec = ModelSpec(source="org/a")
    o = ObservedModel("a", downloaded=True, footprint_bytes=GiB)
    b = Blocked("a", BlockReason.INSUFFICIENT_MEMORY, "needs 1.0 GiB")
    values = {t: (s, r) for t, s, r, _ in derive(spec, o, b, None)}
    assert values[ConditionType.DOWNLOADED] == (True, "Downloaded")
    assert values[ConditionType.RESIDENT] == (False, "InsufficientMemory")
    assert values[ConditionType.READY] == (False, "InsufficientMemory")
    assert values[ConditionType.QUARANTINED] == (False, "")


def test_a_condition_keeps_its_transition_time_until_its_status_flips() -> None:
    book = ConditionBook()
    ready = ConditionType.READY
    assert [c.type for c in book.update("a", [(ready, False, "Loading", "")], 10.0)] == [ready]
    changed = book.update("a", [(ready, False, "InsufficientMemory", "")], 20.0)
    assert changed[0].reason == "InsufficientMemory"
    assert book.get("a")[ready].last_transition_s == 10.0
    book.update("a", [(ready, True, "Ready", "")], 30.0)
    assert book.get("a")[ready].last_transition_s == 30.0
    assert book.update("a", [(ready, True, "Ready", "")], 40.0) == []
    assert book.get("a")[ready].to_json()["lastTransitionTime"].startswith("1970-01-01T00:00:30")


async def test_a_slow_subscriber_loses_its_oldest_events_and_is_told_how_many() -> None:
    bus = EventBus(maxsize=3)
    slow = bus.subscribe()
    for i in range(5):
        bus.publish("tick", i=i)
    got = [await asyncio.wait_for(anext(slow), 1) for _ in range(4)]
    assert got[0] == {"type": "dropped", "count": 2, "time": got[0]["time"]}
    assert [e["i"] for e in got[1:]] == [2, 3, 4]
    slow.close()
    bus.publish("tick", i=5)
    assert slow.pending() == []


async def test_a_subscriber_resumes_after_the_last_event_it_saw() -> None:
    bus = EventBus(maxsize=16, history=4, first_seq=101)
    for i in range(6):
        bus.publish("tick", i=i)  # seq 101..106; seqs 103..106 kept
    resumed = bus.subscribe(after=104)
    assert [e["seq"] for e in resumed.pending()] == [105, 106]
    late = bus.subscribe(after=101)  # seq 102 is no longer kept
    assert await asyncio.wait_for(anext(late), 1) == {
        "type": "dropped",
        "count": 1,
        "time": pytest.approx(time.time(), abs=5),
    }
    assert [e["seq"] for e in late.pending()] == [103, 104, 105, 106]
    # An id from another run of the daemon, before or after this one's (a clock set back):
    # every event of this run is new to it, 101 and 102 lost.
    for before_a_restart in (2, 50, 900):
        restarted = bus.subscribe(after=before_a_restart)
        assert (await asyncio.wait_for(anext(restarted), 1))["count"] == 2
        assert [e["seq"] for e in restarted.pending()] == [103, 104, 105, 106]
    assert bus.subscribe().pending() == []  # without `after`: from now on
    bus.publish("tick", i=6)
    assert [e["seq"] for e in resumed.pending()] == [107]


def test_a_daemon_restarted_numbers_its_events_after_the_last_run_s() -> None:
    # By the clock: a client that saw the last run's events resumes with all of this run's.
    before = EventBus()
    last = before.publish("tick")["seq"]
    time.sleep(0.002)  # a restart takes seconds
    after = EventBus()
    assert after.publish("tick")["seq"] > last


async def test_closing_the_bus_ends_every_subscription_after_what_it_queued() -> None:
    bus = EventBus(maxsize=2)
    waiting, full = bus.subscribe(), bus.subscribe()
    pending = asyncio.ensure_future(anext(waiting))
    await asyncio.sleep(0)  # it waits on an empty queue
    bus.close()
    with pytest.raises(StopAsyncIteration):
        await asyncio.wait_for(pending, 1)
    assert [e["i"] async for e in full] == []
    bus = EventBus(maxsize=2)
    full = bus.subscribe()
    bus.publish("tick", i=0)
    bus.publish("tick", i=1)
    bus.close()
    assert [e["i"] async for e in full] == [0, 1]  # what was queued comes first, whole
    late = bus.subscribe()  # the daemon is stopping: a reconnect ends at once
    with pytest.raises(StopAsyncIteration):
        await asyncio.wait_for(anext(late), 1)


def test_pins_over_the_budget_are_reported_on_the_last_pin() -> None:
    d = desired("2GiB", a={"want": "pinned"}, b={"want": "resident"}, c={"want": "pinned"})
    problems = pins_over_budget(d, {"a": GiB, "b": 5 * GiB, "c": int(1.5 * GiB)}, 64 * GiB)
    assert problems == [
        "models.c.want: the pinned models need 2.5 GiB (a 1.0 GiB, c 1.5 GiB), over the memory"
        " budget of 2.0 GiB (memory.budget 2.0 GiB of 64.0 GiB)"
    ]
    assert pins_over_budget(d, {"a": GiB, "c": None}, 64 * GiB) == []
