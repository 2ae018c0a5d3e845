"""The config file as people's editors and dotfiles treat it: emptied, half written, keys given
twice, symlinked. A bad read keeps the last good state serving; fake engines, real watcher."""

from __future__ import annotations

import asyncio
import os
import shutil
from pathlib import Path

import pytest
import yaml

from tests.component.reconciler_world import World, model, settle, until
from tests.fakes import make_model_dir


async def pinned_and_resident(world: World, **settings: object) -> str:
    """Start with `a` pinned and `b` resident, both ready; returns the good file's text."""
    world.write(a=model(world.model_dir("a"), "pinned"), b=model(world.model_dir("b")))
    await world.build(**settings).start()
    await until(lambda: world.ready("a") and world.ready("b"))
    await until(settle(world))
    return world.config_path.read_text()


@pytest.mark.parametrize("text", ["", "\n   \n", "# models:\n#   a: {source: x}\n"])
async def test_an_emptied_file_keeps_every_model_and_says_how_to_declare_none(
    world: World, text: str
) -> None:
    good = await pinned_and_resident(world)
    generation = world.r.generation
    world.write_text(text)
    await until(lambda: world.r.config_error is not None)
    assert "the file is empty" in (world.r.config_error or "")
    assert "write `models: {}` to declare no models" in (world.r.config_error or "")
    assert world.r.status()["config"]["valid"] is False
    assert world.r.generation == generation
    assert world.loaded() == {"a", "b"}
    assert world.engines.count("unload", "a") == world.engines.count("unload", "b") == 0
    world.write_text(good)
    await until(lambda: world.r.config_error is None)
    assert world.loaded() == {"a", "b"} and world.r.generation == generation


async def test_models_declared_as_none_unload_everything(world: World) -> None:
    await pinned_and_resident(world)
    world.write_text("models: {}\n")
    await until(lambda: not world.loaded())
    assert world.r.config_error is None


async def test_a_file_truncated_then_written_is_read_once_it_settles(world: World) -> None:
    # In place, as an editor without rename saves: truncate, then the content a moment later.
    good = await pinned_and_resident(world, watch_settle_ms=100, watch_debounce_ms=500)
    generation = world.r.generation
    events = world.r.subscribe()
    edited = good.replace("want: resident", "want: resident\n    idle_ttl: 1h")
    with world.config_path.open("r+") as f:
        f.truncate(0)
        os.fsync(f.fileno())
        await asyncio.sleep(0.04)
        f.write(edited)
    await until(lambda: world.r.generation > generation)
    await until(settle(world))
    kinds = [e["type"] for e in events.pending()]
    assert "config_invalid" not in kinds, kinds
    assert world.r.desired.models["b"].idle_ttl_s == 3600
    assert world.loaded() == {"a", "b"} and world.engines.count("unload", "a") == 0


async def test_a_duplicate_key_is_refused_naming_it_and_the_last_good_state_serves(
    world: World,
) -> None:
    good = await pinned_and_resident(world)
    generation = world.r.generation
    b = world.model_dir("b")
    # The second `a` would win in PyYAML: `a` downloaded only, its pin silently gone.
    world.write_text(good + f"  a:\n    source: {b}\n    want: downloaded\n")
    await until(lambda: world.r.config_error is not None)
    error = world.r.config_error or ""
    first = 1 + good.splitlines().index("  a:")
    assert f"models.a (line {len(good.splitlines()) + 1}): duplicate key" in error
    assert f"(first at line {first})" in error
    assert world.r.generation == generation and world.loaded() == {"a", "b"}


async def test_edits_of_a_symlinked_files_target_are_seen_at_once(
    world: World, tmp_path: Path
) -> None:
    dotfiles = tmp_path / "dotfiles"
    dotfiles.mkdir()
    target = dotfiles / "lmx.yaml"
    a = world.model_dir("a")
    target.write_text(yaml.safe_dump({"memory": {"budget": "3GiB"}, "models": {"a": model(a)}}))
    world.config_path.symlink_to(target)
    await world.build().start()  # resync hourly: only the watcher can see the edit
    await until(lambda: world.ready("a"))
    generation = world.r.generation
    b = world.model_dir("b")
    swap = dotfiles / ".lmx.yaml.swp"  # saved by rename, in the target's directory
    swap.write_text(yaml.safe_dump({"models": {"a": model(a), "b": model(b)}}))
    os.replace(swap, target)
    await until(lambda: world.ready("b"))
    assert world.r.generation == generation + 1
    with target.open("a") as f:  # and edited in place
        f.write("jit: false\n")
    await until(lambda: world.r.desired.jit is False)


async def test_a_file_replaced_by_a_symlink_while_running_is_followed(
    world: World, tmp_path: Path
) -> None:
    a = world.model_dir("a")
    world.write(a=model(a))
    await world.build().start()
    await until(lambda: world.ready("a"))
    dotfiles = tmp_path / "dotfiles"
    dotfiles.mkdir()
    target = dotfiles / "lmx.yaml"
    target.write_text(world.config_path.read_text())
    link = tmp_path / ".config.yaml.link"
    link.symlink_to(target)
    os.replace(link, world.config_path)  # as `ln -sf` does
    await asyncio.sleep(0.3)  # the watcher takes the link in (a pass, nothing changed)
    with target.open("a") as f:
        f.write("jit: false\n")
    await until(lambda: world.r.desired.jit is False)


async def test_a_linked_files_directory_replaced_or_gone_a_while_is_watched_again(
    world: World, tmp_path: Path
) -> None:
    """`mv dotfiles dotfiles.old; mkdir dotfiles`, or a link to a directory not there yet (a
    volume not mounted): edits in the directory there now are seen, not only at the resync."""
    dotfiles = tmp_path / "dotfiles"
    dotfiles.mkdir()
    target = dotfiles / "lmx.yaml"
    a = world.model_dir("a")
    target.write_text(yaml.safe_dump({"models": {"a": model(a)}}))
    world.config_path.symlink_to(target)
    await world.build().start()  # resync hourly: only the watcher can see the edits
    await until(lambda: world.ready("a"))
    dotfiles.rename(tmp_path / "dotfiles.old")
    dotfiles.mkdir()
    target.write_text(yaml.safe_dump({"jit": False, "models": {"a": model(a)}}))
    await until(lambda: world.r.desired.jit is False)
    with target.open("a") as f:  # and the new directory is watched: edited in place
        f.write("memory: {budget: 2GiB}\n")
    await until(lambda: world.r.desired.memory.budget == 2 * 2**30)

    shutil.rmtree(dotfiles)  # gone a while: the last good state serves
    await asyncio.sleep(0.3)
    dotfiles.mkdir()
    target.write_text(yaml.safe_dump({"jit": True, "models": {"a": model(a)}}))
    await until(lambda: world.r.desired.jit is True)
    with target.open("a") as f:
        f.write("memory: {budget: 1GiB}\n")
    await until(lambda: world.r.desired.memory.budget == 2**30)


async def test_a_start_that_finds_the_file_invalid_serves_what_it_last_accepted(
    world: World,
) -> None:
    """A typo, then a crash or a restart: the models served before are served again, and status
    says so, until the file is fixed. With none accepted before, none is served."""
    good = await pinned_and_resident(world)
    await world.r.stop()
    kept = world.home / "config.last-good.yaml"
    assert kept.read_text() == good and kept.stat().st_mode & 0o777 == 0o600  # keys, if any
    world.write_text(good.replace("want: pinned", "wnat: pinned"))
    await world.build().start()
    assert "unknown key" in (world.r.config_error or "")
    await until(lambda: world.ready("a") and world.ready("b"))
    assert world.r.status()["config"]["last_good_kept"] is True
    world.write_text(good.replace("want: resident", "want: absent"))  # fixed, and an edit
    await until(lambda: world.r.config_error is None and world.loaded() == {"a"})
    await world.r.stop()

    kept.unlink()  # as on a machine where none was kept
    world.write_text("models:\n  a: {wnat: pinned}\n")
    await world.build().start()
    await until(settle(world))
    assert world.loaded() == set() and world.r.status()["config"]["last_good_kept"] is False


async def test_a_file_unedited_stays_valid_when_its_pins_outgrow_the_budget(
    world: World, tmp_path: Path
) -> None:
    """A pin whose local directory comes later, bigger than the budget: the file read again (the
    resync) is the one accepted, not an edit to refuse; the pin is held back, saying why."""
    later = tmp_path / "later"
    world.write("3GiB", p=model(later, "pinned"))
    await world.build().start()
    await until(settle(world))
    assert world.r.config_error is None  # its size unknown yet
    make_model_dir(later, 4 * 2**30)
    world.r.wake("resync")
    await until(lambda: world.condition("p", "Ready")["reason"] == "ExceedsBudget")
    assert world.r.config_error is None
