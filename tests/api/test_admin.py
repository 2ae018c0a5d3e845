"""/admin over ASGI with the real reconciler, fake engines and a real config file on disk."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from lmx.api.app import create_app
from lmx.api.auth import Keys
from lmx.api.deps import AppDeps, Control
from lmx.reconciler import manifest
from lmx.reconciler.editing import DesiredEditor
from tests.component.reconciler_world import World, settle, until

KEY = "test-admin-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
PATCH = {**AUTH, "Content-Type": "application/merge-patch+json"}


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[World]:
    w = World(tmp_path)
    small = w.model_dir("small", 0.5)
    w.write_text(
        "# my models\n"
        "memory:\n"
        "  budget: 3GiB   # leave room for the OS\n"
        "models:\n"
        "  small:   # the everyday one\n"
        f"    source: {small}\n"
        "    want: resident\n"
        "    engine: {prompt_cache_bytes: 0}\n"
    )
    w.build()
    await w.r.start()
    await until(settle(w))
    try:
        yield w
    finally:
        await w.r.stop()


@contextlib.asynccontextmanager
async def admin_client(
    world: World, path: Path | None = None, keys: Keys | None = None
) -> AsyncIterator[httpx.AsyncClient]:
    """A client of the app whose editor writes `path` (the world's config file)."""
    control = Control(world.r, DesiredEditor(path or world.config_path, world.r))
    deps = AppDeps(
        registry=world.reg, models=world.r, control=control, keys=keys or Keys(admin=lambda: KEY)
    )
    transport = httpx.ASGITransport(app=create_app(deps))
    async with httpx.AsyncClient(transport=transport, base_url="http://lmx.test") as c:
        yield c


@pytest.fixture
async def client(world: World) -> AsyncIterator[httpx.AsyncClient]:
    async with admin_client(world) as c:
        yield c


async def test_get_desired_has_etag_and_generation(client: httpx.AsyncClient) -> None:
    r = await client.get("/admin/desired")
    assert r.status_code == 200
    assert r.headers["etag"].startswith('"')
    body = r.json()
    assert body["valid"] is True and body["generation"] >= 1
    assert body["desired"]["models"]["small"]["want"] == "resident"


async def test_patch_keeps_comments_and_bumps_generation(
    client: httpx.AsyncClient, world: World
) -> None:
    before = await client.get("/admin/desired")
    big = world.model_dir("big", 1.0)
    patch = {"models": {"small": {"want": "pinned"}, "big": {"source": str(big)}}}
    r = await client.patch(
        "/admin/desired", json=patch, headers={**PATCH, "If-Match": before.headers["etag"]}
    )
    assert r.status_code == 200, r.text
    assert r.json()["generation"] == before.json()["generation"] + 1
    text = world.config_path.read_text()
    for comment in ("# my models", "# leave room for the OS", "# the everyday one"):
        assert comment in text
    data = yaml.safe_load(text)
    assert data["models"]["small"]["want"] == "pinned"
    assert data["models"]["big"]["source"] == str(big)
    assert r.headers["etag"] == (await client.get("/admin/desired")).headers["etag"]
    await until(lambda: world.ready("big"))


async def test_two_patches_with_the_same_etag_one_wins_one_gets_412(
    client: httpx.AsyncClient, world: World
) -> None:
    etag = (await client.get("/admin/desired")).headers["etag"]
    a = {"models": {"small": {"idle_ttl": "1h"}}}
    b = {"models": {"small": {"idle_ttl": "2h"}}}
    ra, rb = await asyncio.gather(
        client.patch("/admin/desired", json=a, headers={**PATCH, "If-Match": etag}),
        client.patch("/admin/desired", json=b, headers={**PATCH, "If-Match": etag}),
    )
    assert sorted([ra.status_code, rb.status_code]) == [200, 412]
    loser = ra if ra.status_code == 412 else rb
    assert loser.json()["error"]["code"] == "precondition_failed"
    winner_ttl = "1h" if ra.status_code == 200 else "2h"
    assert (
        yaml.safe_load(world.config_path.read_text())["models"]["small"]["idle_ttl"] == winner_ttl
    )


async def test_patch_without_if_match_applies_over_a_concurrent_file_edit(
    client: httpx.AsyncClient, world: World
) -> None:
    world.write_text(world.config_path.read_text() + "jit: false  # edited by hand\n")
    r = await client.patch(
        "/admin/desired", json={"models": {"small": {"aliases": ["s"]}}}, headers=PATCH
    )
    assert r.status_code == 200
    text = world.config_path.read_text()
    assert "jit: false  # edited by hand" in text and "aliases:" in text


@pytest.mark.parametrize(
    ("patch", "param"),
    [
        ({"models": {"small": {"want": "always"}}}, "models.small.want"),
        ({"models": {"small": {"wnat": "pinned"}}}, "models.small.wnat"),
        ({"memory": {"budget": "lots"}}, "memory.budget"),
    ],
)
async def test_invalid_patch_is_422_naming_the_field_and_changes_nothing(
    client: httpx.AsyncClient, world: World, patch: dict[str, Any], param: str
) -> None:
    before = world.config_path.read_bytes()
    generation = world.r.generation
    r = await client.patch("/admin/desired", json=patch, headers=PATCH)
    assert r.status_code == 422
    assert r.json()["error"]["param"] == param
    assert r.json()["error"]["errors"][0].startswith(param)
    assert world.config_path.read_bytes() == before
    assert world.r.generation == generation


async def test_pinning_more_than_the_budget_is_422_and_nothing_changes(
    client: httpx.AsyncClient, world: World
) -> None:
    huge = world.model_dir("huge", 2.9)
    before = world.config_path.read_bytes()
    patch = {
        "models": {"small": {"want": "pinned"}, "huge": {"source": str(huge), "want": "pinned"}}
    }
    r = await client.patch("/admin/desired", json=patch, headers=PATCH)
    assert r.status_code == 422, r.text
    assert "budget" in r.json()["error"]["message"]
    assert world.config_path.read_bytes() == before


async def test_dry_run_returns_the_plan_and_writes_nothing(
    client: httpx.AsyncClient, world: World
) -> None:
    before = world.config_path.read_bytes()
    big = world.model_dir("big", 1.0)
    r = await client.patch(
        "/admin/desired?dry_run=true", json={"models": {"big": {"source": str(big)}}}, headers=PATCH
    )
    assert r.status_code == 200
    body = r.json()
    assert body["dry_run"] is True
    assert any(a.get("model") == "big" for a in body["plan"]["actions"]), body["plan"]
    assert world.config_path.read_bytes() == before
    assert "big" not in world.loaded()


@pytest.mark.parametrize(
    "headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic x"}]
)
async def test_mutations_need_the_admin_key(
    client: httpx.AsyncClient, world: World, headers: dict[str, str]
) -> None:
    before = world.config_path.read_bytes()
    hdrs = {**headers, "Content-Type": "application/merge-patch+json"}
    r = await client.patch("/admin/desired", json={"jit": False}, headers=hdrs)
    assert r.status_code == 401
    assert r.headers["www-authenticate"] == "Bearer"
    assert r.json()["error"]["code"] == "invalid_api_key"
    r = await client.put("/admin/desired", content="models: {}\n", headers=headers)
    assert r.status_code == 401
    assert world.config_path.read_bytes() == before


async def test_put_replaces_the_whole_file_as_sent(client: httpx.AsyncClient, world: World) -> None:
    text = "# replaced\nmodels: {}\n"
    r = await client.put("/admin/desired", content=text, headers=AUTH)
    assert r.status_code == 200, r.text
    assert world.config_path.read_text() == text
    await until(lambda: not world.loaded())


async def test_status_plan_and_readyz(client: httpx.AsyncClient) -> None:
    status = (await client.get("/admin/status")).json()
    assert status["observedGeneration"] == status["generation"]
    assert "small" in status["models"]
    plan = (await client.get("/admin/plan")).json()
    assert plan["actions"] == []
    assert (await client.get("/readyz")).status_code == 200


CRASH_BETWEEN_WRITE_AND_RENAME = """
import os, sys
from pathlib import Path
from lmx.runtime import files
os.replace = lambda *_: os._exit(9)  # the process dies after the temp file is written
files.write_atomic(Path(sys.argv[1]), "models:\\n  a: {source: builtin:tiny}\\n" * 1000)
"""


def test_a_crash_during_the_write_leaves_the_old_file_whole(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("models: {}\n")
    proc = subprocess.run(
        [sys.executable, "-c", CRASH_BETWEEN_WRITE_AND_RENAME, str(path)], timeout=60
    )
    assert proc.returncode == 9
    assert path.read_text() == "models: {}\n"
    assert yaml.safe_load(path.read_text()) == {"models": {}}


async def test_put_with_broken_yaml_is_422_without_a_field(
    client: httpx.AsyncClient, world: World
) -> None:
    before = world.config_path.read_bytes()
    r = await client.put("/admin/desired", content="models: [\n", headers=AUTH)
    assert r.status_code == 422
    err = r.json()["error"]
    assert err["param"] is None and "invalid YAML" in err["message"]
    assert world.config_path.read_bytes() == before


async def test_openapi_documents_v1_and_admin(client: httpx.AsyncClient) -> None:
    paths = (await client.get("/openapi.json")).json()["paths"]
    for path in ("/v1/chat/completions", "/v1/completions", "/v1/models", "/admin/desired"):
        assert path in paths
    assert {"get", "patch", "put"} <= set(paths["/admin/desired"])
    assert (await client.get("/docs")).status_code == 200


async def test_metrics_count_requests_by_route_and_status(client: httpx.AsyncClient) -> None:
    await client.get("/admin/status")
    await client.patch(
        "/admin/desired", json={}, headers={"Content-Type": "application/merge-patch+json"}
    )
    text = (await client.get("/metrics")).text
    assert 'lmx_requests_total{route="/admin/status",status="200"}' in text
    assert 'lmx_requests_total{route="/admin/desired",status="401"}' in text
    assert "# TYPE lmx_time_to_first_token_seconds histogram" in text


async def test_beyond_loopback_admin_reads_need_the_key_too(world: World) -> None:
    keys = Keys(admin=lambda: KEY, protect_admin_reads=True)
    async with admin_client(world, keys=keys) as c:
        for path in ("/admin/status", "/admin/desired", "/admin/plan"):
            assert (await c.get(path)).status_code == 401
            assert (await c.get(path, headers=AUTH)).status_code == 200
        assert (await c.get("/healthz")).status_code == 200


SECRETS = "server:\n  admin_key: adm-7f3c9\n  api_keys: [inf-a1b2, inf-c3d4]\n"


async def test_get_desired_shows_the_data_as_the_daemon_reads_it_whatever_its_yaml_types(
    client: httpx.AsyncClient, world: World
) -> None:
    # YAML 1.1 as the daemon reads it (`yes` is true), and types JSON lacks: a date, infinity.
    world.write_text(
        "models:\n  small:\n    source: builtin:tiny\n    revision: 2024-01-01\n"
        "    idle_ttl: .inf\n    engine: {temperature_floor: .nan, 1: -.inf}\njit: yes\n"
    )
    r = await client.get("/admin/desired")
    assert r.status_code == 200, r.text
    small = r.json()["desired"]["models"]["small"]
    assert (small["revision"], small["idle_ttl"]) == ("2024-01-01", ".inf")
    assert small["engine"] == {"temperature_floor": ".nan", "1": "-.inf"}
    assert r.json()["desired"]["jit"] is True


async def test_get_desired_hides_secrets_from_a_reader_without_the_admin_key(
    client: httpx.AsyncClient, world: World
) -> None:
    world.write_text(world.config_path.read_text() + SECRETS)
    await until(lambda: world.r.desired.server.api_keys == ("inf-a1b2", "inf-c3d4"))
    anonymous = await client.get("/admin/desired")
    wrong = await client.get("/admin/desired", headers={"Authorization": "Bearer inf-a1b2"})
    for r in (anonymous, wrong):
        assert r.status_code == 200
        assert "adm-7f3c9" not in r.text and "inf-a1b2" not in r.text
        server = r.json()["desired"]["server"]
        assert server == {"admin_key": "<redacted>", "api_keys": ["<redacted>", "<redacted>"]}
    full = await client.get("/admin/desired", headers=AUTH)
    assert full.json()["desired"]["server"]["api_keys"] == ["inf-a1b2", "inf-c3d4"]
    # One ETag for the file, whoever reads it: a redacted read may guard a PATCH. It tells a
    # reader who guessed every secret right nothing: the file's plain hash is not it.
    assert anonymous.headers["etag"] == full.headers["etag"] == wrong.headers["etag"]
    digest = hashlib.sha256(world.config_path.read_bytes()).hexdigest()
    assert digest[:32] not in anonymous.headers["etag"]
    # A key of this daemon's own makes it: another key, another ETag for the same file.
    assert DesiredEditor(world.config_path, world.r).read().etag != anonymous.headers["etag"]
    patch = {"models": {"small": {"idle_ttl": "1h"}}}
    r = await client.patch(
        "/admin/desired", json=patch, headers={**PATCH, "If-Match": anonymous.headers["etag"]}
    )
    assert r.status_code == 200, r.text
    assert "adm-7f3c9" not in r.text and "inf-a1b2" not in r.text  # the answer echoes no secret
    assert world.r.desired.server.admin_key == "adm-7f3c9"


@pytest.mark.parametrize(
    ("patch", "param"),
    [
        ({"server": {"admin_key": "<redacted>"}}, "server.admin_key"),
        ({"server": {"api_keys": ["<redacted>", "<redacted>", "inf-e5f6"]}}, "server.api_keys.0"),
    ],
)
async def test_a_patch_sending_the_redaction_marker_back_is_refused_naming_the_field(
    client: httpx.AsyncClient, world: World, patch: dict[str, Any], param: str
) -> None:
    world.write_text(world.config_path.read_text() + SECRETS)
    await until(lambda: world.r.desired.server.admin_key == "adm-7f3c9")
    before = world.config_path.read_bytes()
    r = await client.patch("/admin/desired", json=patch, headers=PATCH)
    assert r.status_code == 422, r.text
    assert r.json()["error"]["param"] == param
    assert world.config_path.read_bytes() == before
    redacted = (await client.get("/admin/desired")).json()["desired"]
    r = await client.put("/admin/desired", content=yaml.safe_dump(redacted), headers=AUTH)
    assert r.status_code == 422 and r.json()["error"]["param"].startswith("server.")
    assert world.config_path.read_bytes() == before
    assert world.r.desired.server.api_keys == ("inf-a1b2", "inf-c3d4")


async def test_a_patch_that_fixes_an_invalid_file_answers_with_the_file_valid(
    client: httpx.AsyncClient, world: World
) -> None:
    world.write_text(world.config_path.read_text() + "bogus: 1\n")
    await until(lambda: world.r.config_error is not None)
    assert (await client.get("/admin/desired")).json()["valid"] is False
    r = await client.patch("/admin/desired", json={"bogus": None}, headers=PATCH)
    assert r.status_code == 200, r.text
    assert (r.json()["valid"], r.json()["error"]) == (True, None)
    assert world.r.status()["config"]["valid"] is True


async def test_the_plan_says_while_the_file_is_invalid_that_it_is_for_the_last_good_state(
    client: httpx.AsyncClient, world: World
) -> None:
    plan = (await client.get("/admin/plan")).json()
    assert (plan["config"]["valid"], plan["config"]["error"]) == (True, None)
    world.write_text(world.config_path.read_text() + "bogus: 1\n")
    await until(lambda: world.r.config_error is not None)
    plan = (await client.get("/admin/plan")).json()
    assert plan["config"]["valid"] is False and "bogus (line" in plan["config"]["error"]
    assert plan["config"] == (await client.get("/admin/status")).json()["config"]
    assert plan["actions"] == []  # the last good state is in place


async def test_a_patch_of_a_file_with_a_duplicate_key_names_the_key_and_line(
    client: httpx.AsyncClient, world: World
) -> None:
    text = world.config_path.read_text()
    world.write_text(text + "  small:\n    source: elsewhere\n")
    await until(lambda: world.r.config_error is not None)
    before = world.config_path.read_bytes()
    r = await client.patch("/admin/desired", json={"jit": False}, headers=PATCH)
    assert r.status_code == 422, r.text
    err = r.json()["error"]
    line = len(text.splitlines()) + 1
    assert err["param"] == "models.small"
    assert err["errors"] == [
        f"models.small (line {line}): duplicate key (first at line 5); each key may appear once"
    ]
    assert "suppress" not in err["message"] and "http" not in err["message"]
    assert world.config_path.read_bytes() == before


@pytest.mark.parametrize("body", ["", "# nothing here\n"])
async def test_put_of_an_empty_document_is_refused(
    client: httpx.AsyncClient, world: World, body: str
) -> None:
    before = world.config_path.read_bytes()
    r = await client.put("/admin/desired", content=body, headers=AUTH)
    assert r.status_code == 422 and "`models: {}`" in r.json()["error"]["message"]
    assert world.config_path.read_bytes() == before


async def test_a_patch_writes_through_a_symlinked_config_file(tmp_path: Path, world: World) -> None:
    dotfiles = tmp_path / "dotfiles"
    dotfiles.mkdir()
    target = dotfiles / "lmx.yaml"
    target.write_text(world.config_path.read_text())
    link = tmp_path / "linked" / "config.yaml"
    link.parent.mkdir()
    link.symlink_to(target)
    async with admin_client(world, link, Keys(lambda: KEY)) as c:
        r = await c.patch("/admin/desired", json={"jit": False}, headers=PATCH)
    assert r.status_code == 200, r.text
    assert link.is_symlink() and link.resolve() == target
    assert "jit: false" in target.read_text() and "# my models" in target.read_text()
    assert sorted(p.name for p in dotfiles.iterdir()) == ["lmx.yaml"]  # no temp file left


@pytest.mark.parametrize("linked", [False, True])
async def test_a_patch_of_a_missing_config_file_is_409_naming_it_and_writes_nothing(
    tmp_path: Path, world: World, linked: bool
) -> None:
    # Merged into an empty document, the patch was all the file held: every other model was
    # unloaded, and a dangling link's target was created, directories and all.
    text = world.config_path.read_text()
    path, target = world.config_path, tmp_path / "dotfiles" / "lmx" / "config.yaml"
    if linked:
        path = tmp_path / "linked" / "config.yaml"
        path.parent.mkdir()
        path.symlink_to(target)
    else:
        path.unlink()
    generation = world.r.generation
    async with admin_client(world, path, Keys(lambda: KEY)) as c:
        r = await c.patch("/admin/desired", json={"jit": False}, headers=PATCH)
        assert r.status_code == 409, r.text
        message = r.json()["error"]["message"]
        assert message.startswith(f"{path} is missing") and "restore it" in message
        assert ("a link to" in message) == linked
        assert not path.exists() and not target.parent.parent.exists()
        assert world.r.generation == generation and "small" in world.loaded()

        # The whole document may create it (`lmx apply -f` restores a file lost this way).
        r = await c.put("/admin/desired", content=text, headers=AUTH)
        assert r.status_code == 200, r.text
        assert path.read_text() == text


async def test_a_file_that_keeps_changing_while_written_is_a_409_to_retry(
    client: httpx.AsyncClient, world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    # It was a 422 invalid_desired_state, which the CLI showed as "invalid".
    check = world.r.check

    async def an_editor_saves_meanwhile(desired: Any, **kw: Any) -> None:
        world.write_text(world.config_path.read_text() + "# saved meanwhile\n")
        await check(desired, **kw)

    monkeypatch.setattr(world.r, "check", an_editor_saves_meanwhile)
    generation = world.r.generation
    r = await client.patch("/admin/desired", json={"jit": False}, headers=PATCH)
    assert r.status_code == 409, r.text
    err = r.json()["error"]
    assert err["code"] is None and "errors" not in err
    assert err["message"].startswith(f"{world.config_path} changed while it was being written")
    assert err["message"].endswith("nothing was changed; retry")
    assert "jit" not in world.config_path.read_text() and world.r.generation == generation


async def test_a_write_the_disk_refuses_is_an_error_naming_the_file_and_the_os_error(
    client: httpx.AsyncClient, world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    # It was a 500 "internal error: OSError".
    replace = os.replace

    def disk_full(src: Any, dst: Any) -> None:
        if Path(dst) == world.config_path:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        replace(src, dst)

    monkeypatch.setattr(os, "replace", disk_full)
    before = world.config_path.read_bytes()
    generation = world.r.generation
    r = await client.patch("/admin/desired", json={"jit": False}, headers=PATCH)
    assert r.status_code == 500, r.text
    message = r.json()["error"]["message"]
    assert message == f"cannot write {world.config_path}: {os.strerror(errno.ENOSPC)}"
    assert world.config_path.read_bytes() == before and world.r.generation == generation
    assert not list(world.config_path.parent.glob(".config.yaml.*"))  # no temp file left


async def test_an_editors_save_during_a_write_back_is_merged_over_not_lost(
    client: httpx.AsyncClient, world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A save that lands after the change's compare, while its new text is being made durable,
    was renamed over and lost (1 or 2 of 150 under a racing editor): the file is compared
    again right before the rename, and the change made again on the save."""
    chmod = os.chmod
    saved: list[str] = []

    def editor_saves_meanwhile(path: Any, mode: int) -> None:
        if not saved and Path(path).name.startswith(".config.yaml."):
            saved.append(world.config_path.read_text() + "# the editor's line\n")
            world.config_path.write_text(saved[0])
        chmod(path, mode)

    monkeypatch.setattr(os, "chmod", editor_saves_meanwhile)
    r = await client.patch("/admin/desired", json={"jit": False}, headers=PATCH)
    assert r.status_code == 200, r.text
    text = world.config_path.read_text()
    assert saved and "# the editor's line" in text and "jit: false" in text


async def test_an_edit_checks_each_yaml_text_for_duplicate_keys_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    w = World(tmp_path)
    w.write()
    w.build(watch_config=False)  # only the editor reads the file
    await w.r.start()
    checked: list[str] = []
    check_text = manifest.check_text

    def counted(text: str, *, source: str = "config.yaml") -> Any:
        checked.append(text)
        return check_text(text, source=source)

    monkeypatch.setattr(manifest, "check_text", counted)
    control = Control(w.r, DesiredEditor(w.config_path, w.r))
    deps = AppDeps(registry=w.reg, models=w.r, control=control, keys=Keys(admin=lambda: KEY))
    transport = httpx.ASGITransport(app=create_app(deps))
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://lmx.test") as c:
            before = w.config_path.read_text()
            r = await c.patch("/admin/desired", json={"jit": False}, headers=PATCH)
            assert r.status_code == 200, r.text
            assert checked == [before, w.config_path.read_text()]  # the file, then the change

            checked.clear()
            text = "models: {}\njit: true\n"
            r = await c.put("/admin/desired", content=text, headers=AUTH)
            assert r.status_code == 200, r.text
            assert checked == [text]
            r = await c.put("/admin/desired", content=text + "jit: false\n", headers=AUTH)
            assert r.status_code == 422
            assert r.json()["error"]["errors"][0].startswith("jit (line 3): duplicate key")
    finally:
        await w.r.stop()


@pytest.mark.parametrize(
    ("beyond_loopback", "api_keys", "warned"),
    [(True, (), True), (True, ("inf-a1b2",), False), (False, (), False)],
)
async def test_status_warns_while_v1_is_open_to_the_network(
    world: World, beyond_loopback: bool, api_keys: tuple[str, ...], warned: bool
) -> None:
    keys = Keys(admin=lambda: KEY, inference=lambda: api_keys, protect_admin_reads=beyond_loopback)
    async with admin_client(world, keys=keys) as c:
        doc = (await c.get("/admin/status", headers=AUTH)).json()
    assert any("server.api_keys" in w for w in doc["warnings"]) is warned, doc["warnings"]


async def test_a_request_for_a_model_that_never_fits_is_a_409_with_its_reasons_code(
    client: httpx.AsyncClient, world: World
) -> None:
    big = world.model_dir("big", 4)  # the budget is 3 GiB
    patch = {"models": {"big": {"source": str(big), "want": "downloaded"}}}
    assert (await client.patch("/admin/desired", json=patch, headers=PATCH)).status_code == 200
    await until(settle(world))
    chat = {"model": "big", "messages": [{"role": "user", "content": "hi"}]}
    r = await client.post("/v1/chat/completions", json=chat)
    assert r.status_code == 409, r.text
    assert r.json()["error"]["code"] == "exceeds_budget"  # it was null: a script could not tell
