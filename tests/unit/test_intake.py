"""The intake: an engine's commands wait while a burst of requests is still being prepared."""

from __future__ import annotations

import asyncio
import math
from pathlib import Path

import pytest

from lmx.runtime import steptrace
from lmx.runtime.intake import COMING_FOR_S, Intake
from lmx.runtime.steptrace import TraceReader


class Flushes:
    """A held flush that records when (loop time) it ran."""

    def __init__(self) -> None:
        self.at: list[float] = []

    def __call__(self) -> None:
        self.at.append(asyncio.get_running_loop().time())


async def settle() -> None:
    for _ in range(3):  # a few turns of the loop: call_soon chains run out
        await asyncio.sleep(0)


async def test_a_lone_request_is_not_held_past_the_end_of_the_turn() -> None:
    intake, flush = Intake(max_hold_s=5.0), Flushes()
    with intake.preparing():
        intake.reached_engine()
        intake.hold("m", flush)
        assert flush.at == []  # never inside the turn that posted
        await settle()
    assert len(flush.at) == 1


async def test_a_hold_lasts_until_the_burst_has_reached_its_engines() -> None:
    intake, flush = Intake(max_hold_s=5.0), Flushes()
    second_ready = asyncio.Event()

    async def first() -> None:
        with intake.preparing():
            intake.reached_engine()
            intake.hold("m", flush)
            await second_ready.wait()

    async def second() -> None:
        with intake.preparing():
            await asyncio.sleep(0.05)  # still templating, tokenizing...
            intake.reached_engine()
            second_ready.set()

    start = asyncio.get_running_loop().time()
    tasks = [asyncio.create_task(first()), asyncio.create_task(second())]
    await asyncio.sleep(0.02)
    assert flush.at == []
    await asyncio.gather(*tasks)
    await settle()
    assert len(flush.at) == 1
    assert flush.at[0] - start >= 0.05


async def test_a_request_that_never_reaches_an_engine_releases_the_hold_when_it_ends() -> None:
    intake, flush = Intake(max_hold_s=5.0), Flushes()
    with intake.preparing():  # e.g. a 400: bad parameters
        with intake.preparing():
            intake.reached_engine()
            intake.hold("m", flush)
        await settle()
        assert flush.at == []
    await settle()
    assert len(flush.at) == 1


async def test_a_hold_never_outlasts_max_hold() -> None:
    intake, flush = Intake(max_hold_s=0.05), Flushes()
    start = asyncio.get_running_loop().time()
    with intake.preparing():  # never reaches an engine while we wait
        intake.hold("m", flush)
        await asyncio.sleep(0.2)
    assert len(flush.at) == 1
    assert 0.05 <= flush.at[0] - start < 0.15


async def test_a_request_preparing_longer_than_max_hold_holds_nobody() -> None:
    intake, flush = Intake(max_hold_s=0.05), Flushes()
    with intake.preparing():  # e.g. waiting for its model to load
        await asyncio.sleep(0.1)
        intake.hold("m", flush)
        await settle()
        assert len(flush.at) == 1


async def test_requests_coming_are_counted_and_their_end_is_told() -> None:
    intake, none_left = Intake(), Flushes()
    assert intake.count_coming("m", none_left) == 0  # nothing is prepared: nothing to tell later
    with intake.preparing():
        intake.reached_engine()  # this one is at its engine; two more are still being prepared
        with intake.preparing(), intake.preparing():
            assert intake.count_coming("m", none_left) == 2
            assert intake.count_coming("m", none_left) == 2  # asked again: still told once
            await settle()
            assert none_left.at == []
        await settle()
    assert len(none_left.at) == 1


async def test_a_request_for_another_model_stops_counting_once_it_names_it() -> None:
    intake, none_left = Intake(), Flushes()
    with intake.preparing():  # not yet parsed: it may be for either model
        assert intake.count_coming("a", none_left) == 1
        intake.concerns("b")
        await settle()
        assert len(none_left.at) == 1  # a's worker need not wait for it
        assert intake.count_coming("a", none_left) == 0
        assert intake.count_coming("b", Flushes()) == 1


async def test_a_request_preparing_longer_than_a_burst_is_not_coming() -> None:
    # E.g. waiting for its model to load: no idle worker should wait on it, for any model.
    intake = Intake()
    with intake.preparing():
        assert intake.count_coming("a", Flushes()) == 1
        await asyncio.sleep(COMING_FOR_S + 0.02)
        assert intake.count_coming("a", Flushes()) == 0


async def test_a_request_for_another_model_holds_nobody_once_it_names_it() -> None:
    intake, flush = Intake(max_hold_s=5.0), Flushes()
    with intake.preparing():
        intake.concerns("b")  # e.g. waiting for model b to load
        with intake.preparing():
            intake.concerns("a")
            intake.reached_engine()
            intake.hold("a", flush)
        await settle()
        assert len(flush.at) == 1


async def test_with_the_trace_on_a_request_is_logged_where_it_arrives(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(steptrace.ENV, str(tmp_path))
    intake = Intake()
    with intake.preparing():
        intake.reached_engine()
        intake.reached_engine()  # its second sequence: the request reached its engine once
    # On disk shortly after, not in the request's way.
    assert TraceReader(tmp_path).arrivals(0.0, math.inf) == []
    await asyncio.sleep(0.1)
    assert [a.at for a in TraceReader(tmp_path).arrivals(0.0, math.inf)] == ["api", "engine"]
