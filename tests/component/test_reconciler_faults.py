"""Fault injection at the engine boundary: failing, hanging and leaking engines, and crashes."""

from __future__ import annotations

import asyncio
import json
import threading
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from lmx.errors import PermanentError, TemporaryError
from lmx.reconciler import executor, manifest
from lmx.reconciler.spec import ModelSpec
from lmx.runtime.engine import GenerationRequest, SamplingParams
from tests.component.reconciler_world import World, model, until
from tests.fakes import FakeEngine, Faults


async def test_a_load_that_fails_once_backs_off_and_then_succeeds(world: World) -> None:
    world.engines.faults["a"] = Faults(fail_loads=1)
    world.write(a=model(world.model_dir("a")))
    r = world.build()
    events = r.subscribe()
    await r.start()
    await until(lambda: world.ready("a"))
    assert world.engines.count("load", "a") == 2
    await until(lambda: world.condition("a", "Degraded")["status"] is False)
    failed = [e for e in events.pending() if e["type"] == "action" and e["result"] == "failed"]
    assert [e["reason"] for e in failed] == ["LoadFailed"]
    assert "injected load failure" in failed[0]["message"]


async def test_a_request_during_backoff_fails_fast_with_the_cause(world: World) -> None:
    world.engines.faults["c"] = Faults(fail_loads=1)
    world.settings.update(backoff_base_s=30.0, backoff_max_s=30.0)
    world.write(c=model(world.model_dir("c"), "downloaded"))
    await world.build().start()
    with pytest.raises(TemporaryError, match="LoadFailed: RuntimeError: injected") as info:
        await world.r.ensure_ready("c")
    assert info.value.delay_s > 20


async def _quarantined_by_failing_loads(world: World) -> Path:
    """Model "a" declared, its every load failing, until it is quarantined; its directory."""
    world.engines.faults["a"] = Faults(always_fail=True)
    path = world.model_dir("a")
    world.write(a=model(path))
    await world.build().start()
    await until(lambda: world.condition("a", "Quarantined")["status"], timeout_s=5)
    return path


async def test_a_load_that_always_fails_is_quarantined_until_its_spec_changes(
    world: World,
) -> None:
    path = await _quarantined_by_failing_loads(world)
    assert world.condition("a", "Quarantined")["reason"] == "LoadFailed"
    assert world.engines.count("load", "a") == 3  # max_failures
    await asyncio.sleep(0.3)  # longer than the backoff: no further attempts
    assert world.engines.count("load", "a") == 3
    with pytest.raises(PermanentError, match="Quarantined"):
        await world.r.ensure_ready("a")
    assert world.r.servable() == []  # /v1/models offers no model that cannot be served

    world.engines.faults["a"] = Faults()
    world.write(a=model(path, engine={"max_batch": 8}))
    await until(lambda: world.condition("a", "Ready")["status"])
    assert world.condition("a", "Quarantined")["status"] is False
    assert world.r.servable() == ["a"]


async def test_a_load_that_hangs_times_out_and_is_not_started_twice(world: World) -> None:
    release = threading.Event()
    world.engines.faults["a"] = Faults(hang=release)
    world.write(a=model(world.model_dir("a")))
    await world.build(load_timeout_s=0.2).start()
    try:
        await until(lambda: world.condition("a", "Degraded")["reason"] == "LoadTimeout")
        await asyncio.sleep(0.3)
        assert world.engines.count("load", "a") == 1
        assert world.condition("a", "Ready")["status"] is False
    finally:
        release.set()
    await until(lambda: world.ready("a"))  # the late load still counts
    assert world.engines.count("load", "a") == 1


async def test_a_long_load_goes_on_in_the_background_and_holds_no_other_edit_up(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The pass waited for every load (up to load_timeout_s): while a large model loaded, an edit
    # of another model waited, and status read "reconciling" throughout.
    monkeypatch.setattr(executor, "_LOAD_WAIT_S", 0.05)
    release = threading.Event()
    a, b, c = world.model_dir("a"), world.model_dir("b"), world.model_dir("c")
    world.write(b=model(b))
    await world.build(ready_timeout_s=0.5, load_timeout_s=30.0).start()
    await until(lambda: world.ready("b"))
    world.engines.faults["a"] = Faults(hang=release)
    world.write(a=model(a), b=model(b), c=model(c, "downloaded"))
    try:
        await until(lambda: world.condition("a", "Ready")["reason"] == "Loading")
        world.write(a=model(a), b=model(b, "absent"), c=model(c, "downloaded"))
        await until(lambda: world.loaded() == set())  # b unloaded while a still loads
        generation = world.r.status()["generation"]
        await until(lambda: world.r.status()["observedGeneration"] == generation)
        # One load at a time, each measured alone: c's waits for a's.
        with pytest.raises(TemporaryError):
            await world.r.ensure_ready("c")
        assert world.engines.count("load", "c") == 0
        with capture_logs() as logs:
            release.set()
            await until(lambda: world.ready("a"))
    finally:
        release.set()
    assert world.condition("a", "Degraded")["status"] is False
    # Its end is logged as a pass logs the actions it saw end (the log told of none).
    done = [e for e in logs if e["event"] == "action_done" and e["action"] == "Load"]
    assert [(e["model"], e["result"]) for e in done] == [("a", "done")]
    assert await world.r.ensure_ready("c") == "c"


async def test_an_unload_that_keeps_its_memory_holds_back_loads_that_need_it(world: World) -> None:
    world.engines.faults["a"] = Faults(keep_memory_on_unload=True)
    a, b = world.model_dir("a"), world.model_dir("b")
    world.write("1.5GiB", a=model(a))
    await world.build(release_grace_s=60.0).start()
    await until(lambda: world.ready("a"))
    world.write("1.5GiB", a=model(a, "absent"), b=model(b))
    await until(lambda: world.condition("b", "Ready")["reason"] == "MemoryNotReleased")
    assert world.loaded() == set()
    doc = world.r.status()
    assert doc["memory"]["unreleased_bytes"] > 0.9 * 2**30
    assert world.condition("a", "Degraded")["reason"] == "MemoryNotReleased"
    await asyncio.sleep(0.2)
    assert world.engines.count("load", "b") == 0


async def test_memory_that_comes_back_late_lets_the_waiting_load_in(world: World) -> None:
    world.engines.faults["a"] = Faults(return_memory_after_s=0.5)
    a, b = world.model_dir("a"), world.model_dir("b")
    world.write("1.5GiB", a=model(a))
    await world.build(release_grace_s=60.0).start()
    await until(lambda: world.ready("a"))
    world.write("1.5GiB", a=model(a, "absent"), b=model(b))
    await until(lambda: world.condition("b", "Ready")["reason"] == "MemoryNotReleased")
    await until(lambda: world.ready("b"))
    assert world.r.status()["memory"]["unreleased_bytes"] == 0


async def test_memory_still_missing_after_the_grace_period_counts_as_used(world: World) -> None:
    world.engines.faults["a"] = Faults(keep_memory_on_unload=True)
    a, b = world.model_dir("a"), world.model_dir("b")
    world.write("1.5GiB", a=model(a))
    await world.build(release_grace_s=0.2).start()
    await until(lambda: world.ready("a"))
    world.write("1.5GiB", a=model(a, "absent"), b=model(b))
    await until(lambda: world.condition("b", "Ready")["reason"] == "InsufficientMemory")
    assert world.engines.count("load", "b") == 0


def _journal(home: Path, model_id: str, spec: ModelSpec, deaths: int) -> None:
    """A journal as a process that died while loading `model_id` leaves it."""
    digest = spec.load_digest()
    pending = {f"load:{model_id}": {"intent": "load", "model": model_id, "digest": digest}}
    crashes = {model_id: {"digest": digest, "count": deaths}} if deaths else {}
    home.mkdir(parents=True, exist_ok=True)
    (home / "journal.json").write_text(
        json.dumps({"format": 1, "pending": pending, "crashes": crashes})
    )


async def test_a_model_whose_load_killed_the_process_twice_is_quarantined(world: World) -> None:
    world.write(a=model(world.model_dir("a")), b=model(world.model_dir("b")))
    spec = manifest.load(world.config_path).models["a"]
    _journal(world.home, "a", spec, deaths=1)
    await world.build().start()
    await until(lambda: world.ready("b"))
    await until(lambda: world.condition("a", "Quarantined")["status"])
    assert world.condition("a", "Quarantined")["reason"] == "LoadCrashedProcess"
    assert world.engines.count("load", "a") == 0


async def test_a_load_crash_quarantine_is_lifted_by_any_edit_of_the_entry_made_while_down(
    world: World,
) -> None:
    world.write(a=model(world.model_dir("a")))
    spec = manifest.load(world.config_path).models["a"]
    _journal(world.home, "a", spec, deaths=1)
    await world.build().start()
    await until(lambda: world.condition("a", "Quarantined")["status"])
    await world.r.stop()
    await world.build().start()  # kept while the entry is the one that killed the process...
    await until(lambda: world.condition("a", "Quarantined")["status"])
    await world.r.stop()

    world.write(a=model(world.model_dir("a"), "pinned"))  # ...not once it is edited (not its load)
    await world.build().start()
    await until(lambda: world.ready("a"))
    assert json.loads((world.home / "journal.json").read_text())["crashes"] == {}


async def test_a_model_whose_load_killed_the_process_once_is_loaded_again(world: World) -> None:
    world.write(a=model(world.model_dir("a")))
    spec = manifest.load(world.config_path).models["a"]
    _journal(world.home, "a", spec, deaths=0)
    await world.build().start()
    await until(lambda: world.ready("a"))
    journal = json.loads((world.home / "journal.json").read_text())
    assert journal["pending"] == {} and journal["crashes"] == {}


async def test_an_engine_that_dies_after_loading_is_loaded_again(world: World) -> None:
    world.write(a=model(world.model_dir("a")))
    await world.build().start()
    await until(lambda: world.ready("a"))
    engine = world.reg.get("a")
    assert isinstance(engine, FakeEngine)
    engine.crash("the worker process exited unexpectedly (killed by SIGKILL)")
    await until(lambda: world.engines.count("load", "a") == 2 and world.ready("a"))
    assert world.reg.get("a") is not engine
    assert world.engines.memory.held_bytes == world.reg.snapshot()["a"].resident_bytes


async def test_an_engine_that_keeps_crashing_is_reloaded_later_each_time_then_quarantined(
    world: World,
) -> None:
    world.write(a=model(world.model_dir("a")))
    r = world.build(backoff_base_s=0.2, backoff_max_s=1.0)  # quarantined at the third crash
    events = r.subscribe()
    await r.start()
    loop = asyncio.get_running_loop()
    for n in (1, 2):
        await until(lambda n=n: world.engines.count("load", "a") == n and world.ready("a"))
        engine = world.reg.get("a")
        assert isinstance(engine, FakeEngine)
        crashed_at = loop.time()
        engine.crash("the model's worker process exited unexpectedly (killed by SIGSEGV)")
        await until(
            lambda n=n: f"crash {n} in a row" in world.condition("a", "Degraded")["message"]
        )
        await until(lambda n=n: world.engines.count("load", "a") == n + 1, timeout_s=5)
        assert loop.time() - crashed_at >= 0.2 * 2 ** (n - 1) * 0.9  # backed off, doubling
    await until(lambda: world.ready("a"))
    engine = world.reg.get("a")
    assert isinstance(engine, FakeEngine)
    engine.crash()
    await until(lambda: world.condition("a", "Quarantined")["status"])
    assert world.condition("a", "Quarantined")["reason"] == "EngineCrashed"
    await asyncio.sleep(0.5)
    assert world.engines.count("load", "a") == 3
    crashes = [e["in_a_row"] for e in events.pending() if e["type"] == "engine_failed"]
    assert crashes == [1, 2, 3]


async def test_crashes_with_requests_served_between_them_never_quarantine(world: World) -> None:
    # A few bad requests, each crashing a worker that had served others, must not take the model
    # out of service: only crashes with nothing served between them count in a row.
    world.write(a=model(world.model_dir("a")))
    r = world.build(backoff_base_s=0.05, backoff_max_s=0.2)  # quarantined at the third in a row
    events = r.subscribe()
    await r.start()
    for n in (1, 2, 3, 4):
        await until(lambda n=n: world.engines.count("load", "a") == n and world.ready("a"))
        engine = world.reg.get("a")
        assert isinstance(engine, FakeEngine)
        async for _ in engine.stream(GenerationRequest([5, 6], SamplingParams(max_tokens=2))):
            pass
        engine.crash()
    await until(lambda: world.engines.count("load", "a") == 5 and world.ready("a"))
    assert not world.condition("a", "Quarantined")["status"]
    crashes = [e["in_a_row"] for e in events.pending() if e["type"] == "engine_failed"]
    assert crashes == [1, 1, 1, 1]


async def test_crashes_of_engines_that_served_count_from_one_before_their_load_is_recorded(
    world: World,
) -> None:
    # Each engine served, then crashed before the reconcile pass that loaded it recorded the load
    # (a worker that dies on its first requests, under load): the failure record of the crash
    # before is still there, and must not be counted on.
    world.write(a=model(world.model_dir("a")))
    r = world.build(backoff_base_s=0.05, backoff_max_s=0.2)  # quarantined at the third in a row
    await r.start()
    # Ready, and the pass that loaded it over (a load may end before its pass does).
    await until(lambda: world.ready("a") and "id" in r.status()["last_pass"])
    for _ in range(4):
        r._engine_failed("a", "injected crash", served=True)
    assert r.status()["models"]["a"]["failures"] == 1
    passes = r.status()["last_pass"]["id"]
    r.wake("test")
    await until(lambda: r.status()["last_pass"]["id"] > passes)
    assert not world.condition("a", "Quarantined")["status"]


async def test_a_quarantine_outlasts_a_restart_until_the_models_entry_is_edited(
    world: World,
) -> None:
    path = world.model_dir("a")
    world.write(a=model(path))
    await world.build().start()  # max_failures 3: quarantined at the third crash in a row
    for n in (1, 2, 3):
        await until(lambda n=n: world.engines.count("load", "a") == n and world.ready("a"))
        engine = world.reg.get("a")
        assert isinstance(engine, FakeEngine)
        engine.crash()
    await until(lambda: world.condition("a", "Quarantined")["status"])
    await world.r.stop()

    await world.build().start()  # the next process, on the same home
    await until(lambda: world.condition("a", "Quarantined")["status"])
    assert world.condition("a", "Quarantined")["reason"] == "EngineCrashed"
    await asyncio.sleep(0.3)  # longer than the backoff: not loaded again
    assert world.engines.count("load", "a") == 3
    world.write(a=model(path, engine={"max_batch": 8}))  # an edit of its entry lifts it...
    await until(lambda: world.ready("a"))
    await world.r.stop()
    await world.build().start()  # ... for good
    await until(lambda: world.ready("a"))
    assert not world.condition("a", "Quarantined")["status"]


async def test_a_quarantined_model_removed_while_lmx_was_down_comes_back_unquarantined(
    world: World,
) -> None:
    path = await _quarantined_by_failing_loads(world)
    await world.r.stop()
    world.write(b=model(world.model_dir("b")))  # removed: as when removed while lmx runs
    await world.build().start()
    await until(lambda: world.ready("b"))
    await world.r.stop()

    world.engines.faults["a"] = Faults()
    world.write(a=model(path))  # the same entry as when it was quarantined
    await world.build().start()
    await until(lambda: world.ready("a"))


async def test_a_config_file_invalid_at_start_loses_no_quarantine(world: World) -> None:
    path = await _quarantined_by_failing_loads(world)
    await world.r.stop()
    world.write_text(f"models:\n  a:\n    source: {path}\n    wnat: pinned\n")
    await world.build().start()
    assert world.r.config_error is not None

    world.engines.faults["a"] = Faults()
    world.write(a=model(path))  # fixed, back to the entry it was quarantined under
    await until(lambda: world.condition("a", "Quarantined")["status"])
    await asyncio.sleep(0.3)
    assert world.engines.count("load", "a") == 3


async def test_a_journal_that_cannot_be_written_holds_loads_back_until_it_can(
    world: World,
) -> None:
    """A load the journal cannot record (a full disk) waits, never quarantined, and holds no
    other load back; unloads go on. Each loaded once the journal can be written again."""
    world.write(a=model(world.model_dir("a")))
    journal = world.home / "journal.json"
    journal.mkdir(parents=True)  # no file can be renamed over it, as none can be written
    await world.build().start()

    def waiting() -> bool:
        failures = world.r.status()["models"]["a"].get("failures", 0)
        return failures >= 3 and world.condition("a", "Degraded")["reason"] == "JournalUnwritable"

    await until(waiting, timeout_s=10)
    assert "cannot write the journal" in world.condition("a", "Degraded")["message"]
    assert not world.condition("a", "Quarantined")["status"]
    assert world.engines.count("load", "a") == 0
    journal.rmdir()
    await until(lambda: world.ready("a"), timeout_s=10)
    assert json.loads(journal.read_text())["pending"] == {}
    journal.unlink()
    journal.mkdir()
    world.write(a=model(world.model_dir("a"), "absent"))  # its memory comes back all the same
    await until(lambda: world.engines.count("unload", "a") == 1)
    assert world.loaded() == set()
