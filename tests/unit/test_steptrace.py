"""The records the daemon and its workers write with LMX_STEP_TRACE_DIR set, and reading them back."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from lmx.runtime import steptrace
from lmx.runtime.steptrace import (
    Arrival,
    Step,
    TraceLog,
    TraceReader,
    step_of,
)


@dataclass
class PromptResponse:  # the two fields of BatchGenerator's prompt progress that count
    uid: int
    end_of_prompt: bool


def test_a_step_counts_decoded_prompted_and_started_sequences() -> None:
    prompts = [PromptResponse(1, False), PromptResponse(2, False), PromptResponse(3, True)]
    step = step_of(10.0, 10.025, prompts, responses=[object()] * 5)
    assert step == Step(t=10.0, ms=pytest.approx(25.0), decoded=5, prompted=2, started=1)
    assert step.prompt_work
    assert not step_of(0.0, 0.01, [], [object()]).prompt_work
    assert step_of(0.0, 0.01, [], [], after_ms=0.25).after_ms == 0.25
    assert step_of(0.0, 0.01, [], [], 0.25, cache_ms=0.2).cache_ms == 0.2
    assert step_of(0.0, 0.01, [], [], cpu_ms=9.5).cpu_ms == 9.5
    assert math.isnan(step.cpu_ms)  # not measured
    switched = step_of(0.0, 0.01, [], [], switched=(2.0, 1.0))
    assert (switched.blocked, switched.preempted) == (2.0, 1.0)
    assert math.isnan(step.blocked) and math.isnan(step.preempted)


@pytest.mark.skipif(steptrace.switches() is None, reason="no per-thread context switches here")
def test_a_thread_that_sleeps_counts_a_voluntary_switch() -> None:
    before = steptrace.switches()
    time.sleep(0.005)  # off its core until the timer wakes it
    blocked, preempted = steptrace.switches_between(before, steptrace.switches())
    assert blocked >= 1 and preempted >= 0
    assert all(math.isnan(x) for x in steptrace.switches_between(None, before))


def test_lines_reach_the_file_on_flush_and_read_back_by_time(tmp_path: Path) -> None:
    log = TraceLog(tmp_path, "steps")
    steps = [Step(t=float(t), ms=1.0, decoded=1, prompted=0, started=0) for t in (3, 1, 2)]
    for s in steps:
        log.write(s)
    assert TraceReader(tmp_path).steps(0.0, 10.0) == []  # held until the batch goes idle
    log.flush()
    assert [s.t for s in TraceReader(tmp_path).steps(0.0, 10.0)] == [1.0, 2.0, 3.0]
    assert [s.t for s in TraceReader(tmp_path).steps(1.5, 3.0)] == [2.0]
    log.flush()
    assert log.path.name.startswith("steps-") and log.path.suffix == ".jsonl"


def test_only_the_variable_turns_it_on(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(steptrace.ENV, raising=False)
    assert TraceLog.from_env("steps") is None
    monkeypatch.setenv(steptrace.ENV, str(tmp_path / "new"))
    log = TraceLog.from_env("steps")
    assert log is not None and log.path.parent == tmp_path / "new"
    log.flush()


def test_arrivals_are_kept_apart_from_steps(tmp_path: Path) -> None:
    steps, arrivals = TraceLog(tmp_path, "steps"), TraceLog(tmp_path, "arrivals")
    steps.write(Step(t=1.0, ms=1.0, decoded=1, prompted=0, started=0))
    arrivals.write(Arrival(t=2.0, at="worker"))
    arrivals.write(Arrival(t=1.5, at="api"))
    steps.flush()
    arrivals.flush()
    assert [s.t for s in TraceReader(tmp_path).steps(0.0, 10.0)] == [1.0]
    assert TraceReader(tmp_path).arrivals(0.0, 10.0) == [
        Arrival(1.5, "api"),
        Arrival(2.0, "worker"),
    ]


def test_a_reader_takes_in_what_is_appended_and_waits_for_a_line_being_written(
    tmp_path: Path,
) -> None:
    reader = TraceReader(tmp_path / "logs")
    assert reader.steps(0.0, 10.0) == []  # no worker has made the directory yet
    log = TraceLog(tmp_path / "logs", "steps")
    log.write(Step(t=1.0, ms=1.0, decoded=1, prompted=0, started=0))
    log.flush()
    assert [s.t for s in reader.steps(0.0, 10.0)] == [1.0]
    log.write(Step(t=2.0, ms=1.0, decoded=1, prompted=0, started=0))
    log.flush()
    with log.path.open("a", encoding="utf-8") as f:
        f.write('{"t":3.0,"ms":1.0,')
        f.flush()
        assert [s.t for s in reader.steps(0.0, 10.0)] == [1.0, 2.0]
        f.write('"decoded":1,"prompted":0,"started":0}\n')
    assert [s.t for s in reader.steps(0.0, 10.0)] == [1.0, 2.0, 3.0]
    assert [s.t for s in reader.steps(1.5, 10.0)] == [2.0, 3.0]
    assert reader.arrivals(0.0, 10.0) == []
