"""The reconcile loop against fake engines: lifecycle, requests, eviction, drains, TTL, edits."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from lmx.errors import ConfigError, ModelNotFound, PermanentError, TemporaryError
from lmx.reconciler import executor, manifest
from lmx.runtime.sampling import SamplingDefaults
from tests.component.reconciler_world import World, model, settle, until
from tests.fakes import FakeEngine, Faults


async def test_start_loads_pinned_and_resident_models_but_not_downloaded_ones(world: World) -> None:
    world.write(
        a=model(world.model_dir("a"), "pinned"),
        b=model(world.model_dir("b")),
        c=model(world.model_dir("c"), "downloaded"),
    )
    await world.build().start()
    await until(lambda: world.ready("a") and world.ready("b"))
    await until(settle(world))
    assert world.loaded() == {"a", "b"}
    assert world.condition("c", "Ready")["reason"] == "LoadsOnRequest"
    assert world.condition("a", "Ready")["status"] is True
    assert world.engines.history[0] == ("load", "a")  # pins first


async def test_a_request_loads_a_downloaded_model_through_its_alias(world: World) -> None:
    world.write(c=model(world.model_dir("c"), "downloaded", aliases=["gpt-4o-mini"]))
    await world.build().start()
    assert await world.r.ensure_ready("gpt-4o-mini") == "c"
    assert world.ready("c")
    assert await world.r.ensure_ready("c") == "c"  # ready: answered without the loop
    assert world.engines.count("load", "c") == 1


async def test_a_request_for_an_unknown_or_absent_model_raises_model_not_found(
    world: World,
) -> None:
    world.write(a=model(world.model_dir("a"), "absent"), b=model(world.model_dir("b")))
    await world.build().start()
    with pytest.raises(ModelNotFound, match="'nope' not found; available: b"):
        await world.r.ensure_ready("nope")
    with pytest.raises(ModelNotFound):
        await world.r.ensure_ready("a")


async def test_with_jit_off_a_request_does_not_load_a_downloaded_model(world: World) -> None:
    world.write_text(
        f"jit: false\nmodels:\n  c: {{source: {world.model_dir('c')}, want: downloaded}}\n"
    )
    await world.build().start()
    with pytest.raises(PermanentError, match="JitDisabled"):
        await world.r.ensure_ready("c")
    assert world.loaded() == set()


async def test_a_request_evicts_the_least_recently_used_model_when_over_budget(
    world: World,
) -> None:
    world.write(
        "3GiB",
        a=model(world.model_dir("a")),
        b=model(world.model_dir("b")),
        c=model(world.model_dir("c"), "downloaded"),
    )
    await world.build().start()
    await until(lambda: world.ready("a") and world.ready("b"))
    world.reg.touch("a")  # b is now the least recently used
    assert await world.r.ensure_ready("c") == "c"
    assert world.loaded() == {"a", "c"}
    assert world.engines.count("unload", "a") == 0
    assert world.condition("b", "Ready")["reason"] == "InsufficientMemory"


async def test_a_busy_model_is_drained_and_evicted_only_when_its_requests_finish(
    world: World,
) -> None:
    world.write("2GiB", a=model(world.model_dir("a")), c=model(world.model_dir("c"), "downloaded"))
    await world.build().start()
    await until(lambda: world.ready("a"))
    async with world.reg.acquire("a"):
        waiting = asyncio.create_task(world.r.ensure_ready("c"))
        await until(lambda: world.condition("a", "Draining")["status"])
        await asyncio.sleep(0.1)
        assert world.loaded() == {"a"}  # drained, not cut
        assert not waiting.done()
        # Charged: what is loaded, not the room kept for c beside it (over the budget).
        doc = world.r.status()
        a_charge = doc["models"]["a"]["footprint"]["measured_bytes"]
        assert doc["memory"]["charged_bytes"] == a_charge <= doc["memory"]["budget_bytes"]
        assert doc["plan"]["used_bytes"] > doc["memory"]["budget_bytes"]
    assert await asyncio.wait_for(waiting, 5) == "c"
    assert world.loaded() == {"c"}


@pytest.mark.parametrize("load_s", [0.0, 0.3], ids=["load_within_the_pass", "load_in_background"])
async def test_a_request_with_no_room_beside_a_load_for_an_earlier_one_waits_its_turn(
    world: World, monkeypatch: pytest.MonkeyPatch, load_s: float
) -> None:
    """Two requests at once for models loaded on demand, room for one: the second is not
    refused; the first model loads and serves, then is evicted for it."""
    monkeypatch.setattr(executor, "_LOAD_WAIT_S", 0.1)
    world.engines.faults["a"] = Faults(load_s=load_s)
    world.write(
        "2GiB",
        a=model(world.model_dir("a"), "downloaded"),
        b=model(world.model_dir("b"), "downloaded"),
    )
    await world.build().start()

    async def serve(name: str) -> str:
        mid = await world.r.ensure_ready(name)
        async with world.reg.acquire(mid):
            await asyncio.sleep(0.1)
        return mid

    assert await asyncio.gather(serve("a"), serve("b")) == ["a", "b"]
    assert world.engines.history == [("load", "a"), ("unload", "a"), ("load", "b")]


async def test_a_request_waiting_its_turn_gives_up_at_the_ready_timeout(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(executor, "_LOAD_WAIT_S", 0.05)
    release = threading.Event()
    world.engines.faults["a"] = Faults(hang=release)
    world.write(
        "2GiB",
        a=model(world.model_dir("a"), "downloaded"),
        b=model(world.model_dir("b"), "downloaded"),
    )
    await world.build(ready_timeout_s=0.5, load_timeout_s=30.0).start()
    try:
        first = asyncio.create_task(world.r.ensure_ready("a"))
        await until(lambda: world.condition("a", "Ready")["reason"] == "Loading")
        with pytest.raises(TemporaryError, match=r"not ready after 0\.5s"):
            await world.r.ensure_ready("b")
        assert world.condition("b", "Ready")["reason"] == "WaitingForTurn"
        with pytest.raises(TemporaryError, match=r"not ready after 0\.5s"):
            await first
    finally:
        release.set()
    assert world.engines.count("load", "b") == 0


async def test_a_drain_that_outlives_its_deadline_unloads_the_model_anyway(world: World) -> None:
    world.write("2GiB", a=model(world.model_dir("a")), c=model(world.model_dir("c"), "downloaded"))
    world.settings["drain_timeout_s"] = 0.3
    await world.build().start()
    await until(lambda: world.ready("a"))
    async with world.reg.acquire("a"):
        assert await world.r.ensure_ready("c") == "c"
        assert world.loaded() == {"c"}


async def test_idle_ttl_unloads_a_resident_model_and_a_request_brings_it_back(world: World) -> None:
    world.write(
        a=model(world.model_dir("a"), idle_ttl="0.3s"),
        p=model(world.model_dir("p"), "pinned", idle_ttl="0.1s"),
    )
    await world.build().start()
    await until(lambda: world.ready("a"))
    await until(lambda: world.condition("a", "Resident")["reason"] == "IdleTimeout", timeout_s=3)
    assert "a" not in world.loaded()
    assert world.ready("p")  # pinned: never unloaded for idleness
    await asyncio.sleep(0.1)
    assert world.engines.count("load", "a") == 1  # not reloaded eagerly
    assert await world.r.ensure_ready("a") == "a"
    assert world.engines.count("load", "a") == 2


async def test_status_shows_the_sampling_defaults_of_a_loaded_model(world: World) -> None:
    """Its spec's, over its files': what a request that leaves them out gets."""
    world.write(s=model(world.model_dir("s"), sampling={"temperature": 0.2}))
    await world.build().start()
    await until(lambda: world.ready("s"))
    engine = world.reg.get("s")
    assert isinstance(engine, FakeEngine)
    engine.sampling_defaults = SamplingDefaults(temperature=0.6, top_p=0.95)  # its files'
    assert world.r.status()["models"]["s"]["sampling"] == {"temperature": 0.2, "top_p": 0.95}
    world.write(s=model(world.model_dir("s")))  # no spec's: the files' alone, no reload
    await until(lambda: world.r.status()["models"]["s"]["sampling"]["temperature"] == 0.6)
    assert world.r.status()["models"]["s"]["sampling"] == {"temperature": 0.6, "top_p": 0.95}
    assert world.engines.count("load", "s") == 1


async def test_status_shows_the_sampling_defaults_of_a_model_on_disk_before_it_loads(
    world: World,
) -> None:
    path = world.model_dir("d")
    (path / "generation_config.json").write_text('{"temperature": 0.6, "top_k": 20}')
    world.write(d=model(path, "downloaded", sampling={"temperature": 0.2, "top_p": 0.8}))
    await world.build().start()
    await until(lambda: world.r.status()["models"]["d"]["sampling"])
    assert world.r.status()["models"]["d"]["sampling"] == {
        "temperature": 0.2,
        "top_p": 0.8,
        "top_k": 20,
    }
    assert "d" not in world.loaded()


async def test_a_requests_ttl_unloads_a_model_it_loaded_on_demand_once_idle(world: World) -> None:
    """LM Studio's per-request `ttl`, for a `downloaded` model whose spec sets no idle_ttl;
    a resident model keeps what its spec says."""
    world.write(d=model(world.model_dir("d"), "downloaded"), r=model(world.model_dir("r")))
    await world.build().start()
    await until(lambda: world.ready("r"))
    assert await world.r.ensure_ready("d") == "d"
    for mid in ("d", "r"):
        async with world.reg.acquire(mid, ttl_s=0.3):
            pass
    # As status shows it: the request's for the model loaded on demand, none for the other.
    models = world.r.status()["models"]
    assert (models["d"]["idle_ttl_s"], models["r"]["idle_ttl_s"]) == (0.3, None)
    await until(lambda: world.condition("d", "Resident")["reason"] == "IdleTimeout", timeout_s=3)
    assert "d" not in world.loaded() and world.ready("r")
    assert world.r.status()["models"]["d"]["idle_ttl_s"] is None  # not loaded
    # Loaded again, the engine has no ttl until a request asks for one.
    assert await world.r.ensure_ready("d") == "d"
    await asyncio.sleep(0.5)
    assert world.ready("d") and world.reg.snapshot()["d"].ttl_s is None


async def test_a_ttl_runs_from_the_end_of_a_request_that_outlasted_the_pass_that_saw_it(
    world: World,
) -> None:
    """A request's `ttl` and a spec's `idle_ttl`, each for a model whose request a pass saw in
    flight: the end of a request wakes no pass, yet the model unloads about a ttl after it."""
    world.write(
        d=model(world.model_dir("d"), "downloaded"), r=model(world.model_dir("r"), idle_ttl="0.3s")
    )
    await world.build().start()
    await until(lambda: world.ready("r"))
    assert await world.r.ensure_ready("d") == "d"
    async with world.reg.acquire("d", ttl_s=0.3), world.reg.acquire("r"):
        passes = world.r.status()["last_pass"]["id"]
        await until(lambda: world.r.status()["last_pass"]["id"] > passes)  # saw both busy
        await asyncio.sleep(0.5)  # longer than the ttl: busy, so loaded still
        assert world.loaded() == {"d", "r"}
    ended = time.monotonic()
    await until(lambda: not world.loaded(), timeout_s=3)  # the resync is an hour away
    assert time.monotonic() - ended < 1.5


async def test_editing_the_file_loads_and_unloads_without_touching_unchanged_models(
    world: World,
) -> None:
    a, b, c = world.model_dir("a"), world.model_dir("b"), world.model_dir("c")
    world.write(a=model(a), b=model(b))
    await world.build().start()
    await until(lambda: world.ready("a") and world.ready("b"))
    engine_a = world.reg.get("a")
    generation = world.r.generation
    world.write(a=model(a, aliases=["x"]), b=model(b, "absent"), c=model(c, "pinned"))
    await until(lambda: world.ready("c") and "b" not in world.loaded())
    assert world.reg.get("a") is engine_a
    assert world.engines.count("load", "a") == 1
    assert world.r.generation == generation + 1
    await until(settle(world))
    assert world.r.status()["observedGeneration"] == world.r.generation


async def test_a_bad_edit_keeps_the_last_good_spec_and_reports_the_error(world: World) -> None:
    a = world.model_dir("a")
    world.write(a=model(a))
    await world.build().start()
    await until(lambda: world.ready("a"))
    good = world.r.desired
    world.write_text(f"models:\n  a: {{source: {a}, want: sometimes}}\n")
    await until(lambda: world.r.config_error is not None)
    assert "models.a.want (line 2)" in (world.r.config_error or "")
    assert world.r.desired == good
    assert world.r.status()["config"]["valid"] is False
    [config_valid] = world.r.status()["conditions"]
    assert (config_valid["type"], config_valid["status"]) == ("ConfigValid", False)
    assert "models.a.want" in config_valid["message"]
    assert world.ready("a") and world.engines.count("unload", "a") == 0
    world.write(a=model(a), b=model(world.model_dir("b")))
    await until(lambda: world.r.config_error is None and world.ready("b"))


async def test_a_file_whose_pins_exceed_the_budget_is_rejected_naming_the_line(
    world: World,
) -> None:
    a, b = world.model_dir("a"), world.model_dir("b")
    world.write("3GiB", a=model(a, "pinned"))
    await world.build().start()
    await until(lambda: world.ready("a"))
    world.write("2GiB", a=model(a, "pinned"), b=model(b, "pinned"))
    await until(lambda: world.r.config_error is not None)
    lines = world.config_path.read_text().splitlines()
    want_b = next(
        i + 1
        for i, line in enumerate(lines)
        if line.strip() == "want: pinned" and i > lines.index("  b:")
    )
    error = world.r.config_error or ""
    assert f"models.b.want (line {want_b}): the pinned models need 2.1 GiB" in error
    assert world.loaded() == {"a"}


async def test_apply_desired_rejects_pins_over_budget_and_keeps_the_generation(
    world: World,
) -> None:
    world.write("3GiB")
    await world.build().start()
    generation = world.r.generation
    too_much = manifest.validate(
        {
            "memory": {"budget": "2GiB"},
            "models": {
                "a": model(world.model_dir("a"), "pinned"),
                "b": model(world.model_dir("b"), "pinned"),
            },
        }
    )
    with pytest.raises(ConfigError, match=r"models\.b\.want: the pinned models need"):
        await world.r.check(too_much)
    with pytest.raises(ConfigError, match=r"models\.b\.want: the pinned models need"):
        await world.r.apply_desired(too_much)
    assert world.r.generation == generation


async def test_apply_desired_reloads_a_model_whose_load_parameters_changed(world: World) -> None:
    a = world.model_dir("a")
    world.write(a=model(a))
    await world.build().start()
    await until(lambda: world.ready("a"))
    first = world.reg.get("a")
    new = manifest.validate(
        {"memory": {"budget": "3GiB"}, "models": {"a": model(a, engine={"max_batch": 2})}}
    )
    await world.r.apply_desired(new)
    await until(lambda: world.ready("a") and world.reg.get("a") is not first)
    engine = world.reg.get("a")
    assert engine is not None and engine.config.max_batch == 2


async def test_subscribers_see_actions_and_condition_changes(world: World) -> None:
    world.write(a=model(world.model_dir("a")))
    r = world.build()
    events = r.subscribe()
    await r.start()
    seen: list[dict[str, object]] = []
    async with asyncio.timeout(5):
        async for ev in events:
            seen.append(ev)
            if ev["type"] == "condition_changed" and ev["model"] == "a":
                cond = ev["condition"]
                assert isinstance(cond, dict)
                if cond["type"] == "Ready" and cond["status"] is True:
                    break
    events.close()
    actions = [e for e in seen if e["type"] == "action"]
    assert {"action": "Load", "model": "a", "result": "done"}.items() <= actions[0].items()
    assert any(e["type"] == "desired_changed" for e in seen)


async def test_status_reports_generations_memory_and_per_model_state(world: World) -> None:
    world.write("3GiB", a=model(world.model_dir("a")))
    await world.build().start()
    await until(lambda: world.ready("a"))
    await until(settle(world))
    doc = world.r.status()
    assert doc["generation"] == doc["observedGeneration"] == 1
    assert doc["memory"]["budget_bytes"] == 3 * 2**30
    a = doc["models"]["a"]
    assert [c["type"] for c in a["conditions"]] == [
        "Downloaded", "Resident", "Ready", "Draining", "Degraded", "Quarantined",
    ]  # fmt: skip
    assert a["footprint"]["measured_bytes"] == 2**30 + 32 * 2**20 + int(0.05 * 0 * 2**30) + (
        int(2**30 * 0.05) - 32 * 2**20
    )
    assert a["footprint"]["prompt_cache_bytes"] == 0  # the world's models have none
    assert a["in_flight"] == 0 and a["last_used"] is not None
    assert world.r.servable() == ["a"]
    assert world.r.plan_now().is_empty
    # Requests in flight as they are now, not as the last pass saw them (none runs meanwhile).
    passes = world.r.status()["last_pass"]
    async with world.reg.acquire("a"), world.reg.acquire("a"):
        doc = world.r.status()
        assert doc["models"]["a"]["in_flight"] == 2 and doc["last_pass"] == passes
    assert world.r.status()["models"]["a"]["in_flight"] == 0
    # And the sequences waiting for a place in its batch, as its engine counts them.
    engine = world.reg.get("a")
    assert isinstance(engine, FakeEngine) and a["waiting"] == 0
    engine.queued = 3
    assert world.r.status()["models"]["a"]["waiting"] == 3


async def test_status_notes_a_context_length_past_the_models_own(world: World) -> None:
    # The engine serves the model's own length (4096 where config.json names none), and lmx ps
    # shows it; the spec said more, and nothing told the user why it is not what they asked.
    world.write(
        a=model(world.model_dir("a"), engine={"context_length": 8192}),
        b=model(world.model_dir("b", 0.5), engine={"context_length": 4096}),
    )
    await world.build().start()
    await until(lambda: world.ready("a") and world.ready("b"))
    models = world.r.status()["models"]
    assert models["a"]["notes"] == [
        "engine.context_length 8192 is more than the model's own 4096 tokens (its config.json): "
        "it serves 4096"
    ]
    assert models["b"]["notes"] == []


async def test_a_model_list_tells_each_name_its_models_state_files_and_context(
    world: World,
) -> None:
    world.write(
        a=model(world.model_dir("a"), aliases=["first"], engine={"context_length": 2048}),
        b=model(world.model_dir("b"), "downloaded", engine={"context_length": 1024}),
    )
    await world.build().start()
    await until(lambda: world.ready("a"))
    await until(settle(world))
    listed = world.r.listed()
    assert [e.name for e in listed] == world.r.servable() == ["a", "first", "b"]
    a, first, b = listed
    assert (a.model_id, a.state, a.context_length) == ("a", "loaded", 2048)  # the engine's
    assert first.model_id == "a" and first.path == a.path == world.model_dir("a")
    assert (b.state, b.context_length, b.source) == ("not-loaded", 1024, str(world.model_dir("b")))
    # A load under way: listed as loading, then loaded.
    loaded = threading.Event()
    world.engines.faults_for("b").hang = loaded
    task = asyncio.create_task(world.r.ensure_ready("b"))
    try:
        await until(lambda: world.r.listed()[-1].state == "loading")
        # And status says so as of now: the pass waits for the load to end.
        conditions = world.r.status()["models"]["b"]["conditions"]
        kinds = {c["type"]: c for c in conditions}
        assert kinds["Ready"]["reason"] == kinds["Resident"]["reason"] == "Loading"
        # And the plan, once a pass has seen it under way (not "no changes").
        under_way = [{"action": "Load", "model": "b"}]
        await until(lambda: world.r.plan_now_json()["under_way"] == under_way)
    finally:
        loaded.set()
    assert await task == "b"
    assert world.r.listed()[-1].state == "loaded"


async def test_a_model_too_big_beside_the_pins_is_refused_for_good_and_not_offered(
    world: World,
) -> None:
    # 3 GiB budget, a 2 GiB pin: a 1.5 GiB model can never be loaded while the pin stays.
    world.write(
        "3GiB",
        p=model(world.model_dir("p", 2), "pinned"),
        big=model(world.model_dir("big", 1.5), "downloaded"),
    )
    await world.build().start()
    await until(lambda: world.ready("p"))
    await until(settle(world))
    with pytest.raises(PermanentError, match=r"ExceedsBudget: needs .*the pinned models take") as e:
        await world.r.ensure_ready("big")
    assert e.value.code == "exceeds_budget"  # the 409's code, for scripts
    assert world.r.servable() == ["p"]


async def test_stop_unloads_every_engine(world: World) -> None:
    world.write(a=model(world.model_dir("a")), b=model(world.model_dir("b")))
    await world.build().start()
    await until(lambda: world.ready("a") and world.ready("b"))
    await world.r.stop()
    world.reconciler = None
    assert world.loaded() == set()
    assert world.engines.memory.held_bytes == 0


async def test_the_resync_timer_picks_up_an_edit_the_watcher_missed(world: World) -> None:
    a = world.model_dir("a")
    world.write(a=model(a, "downloaded"))
    await world.build(watch_config=False, resync_interval_s=0.2).start()
    await until(settle(world))
    world.write(a=model(a))
    await until(lambda: world.ready("a"))


async def test_a_dry_run_plans_a_desired_state_without_accepting_it(world: World) -> None:
    a = world.model_dir("a")
    world.write(a=model(a, "downloaded"))
    await world.build().start()
    await until(settle(world))
    generation = world.r.generation
    candidate = manifest.validate({"models": {"a": model(a, "pinned")}})
    dry = await world.r.dry_run(candidate)
    assert [type(x).__name__ for x in dry.actions] == ["Load"]
    assert world.r.generation == generation and world.loaded() == set()
    assert world.r.plan_now_json()["actions"] == []


async def test_a_drain_is_called_off_when_the_change_that_began_it_is_undone(
    world: World,
) -> None:
    """A busy model whose spec changed drains for its reload; the change undone, it serves on,
    never unloaded (it refused every request, "being unloaded", until its next change)."""
    world.write(a=model(world.model_dir("a")))
    await world.build().start()
    await until(lambda: world.ready("a"))
    async with world.reg.acquire("a"):
        world.write(a=model(world.model_dir("a"), engine={"context_length": 2048}))
        await until(lambda: world.condition("a", "Draining")["status"])
        world.write(a=model(world.model_dir("a")))
        await until(settle(world))
        await until(lambda: not world.condition("a", "Draining")["status"])
        async with world.reg.acquire("a"):  # admitted again while the first is in flight
            pass
    await until(settle(world))
    assert world.ready("a") and world.engines.count("load", "a") == 1
    assert world.engines.count("unload", "a") == 0
