"""The model store (sources, footprints) and Hub models through the reconciler, on a local Hub."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from lmx.runtime.download_manifest import RemoteFile, RepoSnapshot
from lmx.runtime.store import (
    MARGIN_MIN_BYTES,
    ModelStore,
    Sizing,
    estimate,
    kv_bytes_per_token,
    safetensors_weight_bytes,
)
from tests.component.reconciler_world import World, until
from tests.crash import Killed, kill_at_unlink
from tests.fakes import MiB, make_model_dir
from tests.hubserver import HubServer

QWEN3_8B = {  # config.json of Qwen3-8B, the fields the estimate reads
    "num_hidden_layers": 36,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "hidden_size": 4096,
    "max_position_embeddings": 40960,
    "torch_dtype": "bfloat16",
}


def safetensors_bytes(tensors: dict[str, int], data: bool = True) -> bytes:
    """A safetensors file with one U8 tensor per entry of the given size."""
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, n in tensors.items():
        header[name] = {"dtype": "U8", "shape": [n], "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + (bytes(offset) if data else b"")


def test_weight_bytes_come_from_the_safetensors_header_alone(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    path.write_bytes(safetensors_bytes({"a": 1000, "b": 24}, data=False))
    assert safetensors_weight_bytes(path) == 1024


def test_kv_bytes_per_token_follow_the_config() -> None:
    assert kv_bytes_per_token(QWEN3_8B) == 2 * 36 * 8 * 128 * 2
    no_head_dim = {"num_hidden_layers": 2, "num_attention_heads": 4, "hidden_size": 64}
    assert kv_bytes_per_token({**no_head_dim, "torch_dtype": "float32"}) == 2 * 2 * 4 * 16 * 4
    assert kv_bytes_per_token({"text_config": QWEN3_8B}) == 147456
    assert kv_bytes_per_token({"model_type": "mystery"}) is None


def test_the_estimate_reserves_kv_for_the_declared_context_and_batch() -> None:
    fp = estimate(
        4 * 2**30, QWEN3_8B, Sizing(context_length=8192, max_batch=4, prompt_cache_bytes=0)
    )
    assert fp.kv_bytes == 147456 * 8192 * 4
    assert fp.context_tokens == 8192
    assert fp.margin_bytes == int((4 * 2**30 + fp.kv_bytes) * 0.05)
    native = estimate(0, QWEN3_8B, Sizing(None, 1, 0))
    assert native.context_tokens == 40960  # undeclared: the model's own, as the engine does
    tiny = estimate(1000, {}, Sizing(None, 16, 7))
    assert (tiny.kv_bytes, tiny.margin_bytes, tiny.total_bytes) == (
        0,
        MARGIN_MIN_BYTES,
        1007 + MARGIN_MIN_BYTES,
    )


def test_an_embedding_model_reserves_one_batch_of_rows_and_no_prompt_cache(
    tmp_path: Path,
) -> None:
    sizing = Sizing(context_length=8192, max_batch=8, prompt_cache_bytes=2**30, prefill_step=2048)
    chat = estimate(0, QWEN3_8B, sizing)
    assert (chat.kv_bytes, chat.prompt_cache_bytes) == (147456 * 8192 * 8, 2**30)
    embed = estimate(0, QWEN3_8B, sizing, embedding_only=True)
    assert (embed.kv_bytes, embed.prompt_cache_bytes) == (147456 * 8192, 0)  # one whole row
    short = Sizing(context_length=512, max_batch=8, prompt_cache_bytes=0, prefill_step=2048)
    assert estimate(0, QWEN3_8B, short, embedding_only=True).kv_bytes == 147456 * 2048  # a chunk

    path = make_model_dir(tmp_path / "m", 100 * MiB)
    (path / "config.json").write_text(json.dumps(QWEN3_8B))
    store = ModelStore(tmp_path / "home")
    as_chat = store.footprint("m", "k", str(path), "main", sizing)
    (path / "modules.json").write_text("[]")  # a sentence-transformers pipeline now
    as_embedding = store.footprint("m", "k", str(path), "main", sizing)
    assert as_chat is not None and as_chat.kv_bytes == chat.kv_bytes
    assert as_embedding is not None and as_embedding.kv_bytes == embed.kv_bytes
    assert as_embedding.prompt_cache_bytes == 0

    files = (RemoteFile("model.safetensors", 100 * MiB), RemoteFile("config.json", 10))
    for extra, cache_bytes in (((), 2**30), ((RemoteFile("modules.json", 2),), 0)):
        snapshot = RepoSnapshot("org/m", "main", "0" * 40, files + extra)
        remote = store.estimate_remote("r", "k", snapshot, sizing, fetch_config=False)
        assert remote.prompt_cache_bytes == cache_bytes  # the Hub's file list tells, unfetched


def test_a_measured_load_replaces_the_estimated_weights_and_is_kept_across_restarts(
    tmp_path: Path,
) -> None:
    path = make_model_dir(tmp_path / "m", 100 * MiB)
    store = ModelStore(tmp_path / "home")
    sizing = Sizing(None, 1, 0)
    before = store.footprint("m", "k1", str(path), "main", sizing)
    assert before is not None and not before.measured and before.weights_bytes == 100 * MiB
    store.record_measured("m", "k1", 150 * MiB, before.weights_bytes)
    again = ModelStore(tmp_path / "home").footprint("m", "k1", str(path), "main", sizing)
    assert again is not None and again.measured and again.weights_bytes == 150 * MiB
    other_config = store.footprint("m", "k2", str(path), "main", sizing)
    assert other_config is not None and not other_config.measured
    # A measurement of the kind before idle spares were left out: the estimate again.
    table = json.loads((tmp_path / "home" / "footprints.json").read_text())
    del table["m@k1"]["measure"]
    (tmp_path / "home" / "footprints.json").write_text(json.dumps(table))
    old = ModelStore(tmp_path / "home").footprint("m", "k1", str(path), "main", sizing)
    assert old is not None and not old.measured and old.weights_bytes == 100 * MiB


def test_a_measurement_of_other_weights_under_the_same_spec_is_not_charged(
    tmp_path: Path,
) -> None:
    """A local model rebuilt in place (a Hub branch moved on): its old measurement would let
    the new, bigger weights in under their size."""
    path = make_model_dir(tmp_path / "m", 100 * MiB)
    store = ModelStore(tmp_path / "home")
    sizing = Sizing(None, 1, 0)
    before = store.footprint("m", "k1", str(path), "main", sizing)
    assert before is not None
    store.record_measured("m", "k1", 150 * MiB, before.weights_bytes)
    make_model_dir(path, 300 * MiB)
    after = store.footprint("m", "k1", str(path), "main", sizing)
    assert after is not None and not after.measured and after.weights_bytes == 300 * MiB


def test_sources_resolve_to_their_directories(tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "home", base_dir=tmp_path / "cfg")
    assert store.locate("org/name") == tmp_path / "home" / "models" / "org--name"
    assert store.locate("./mine") == tmp_path / "cfg" / "mine"
    assert store.locate("file:/abs/x") == Path("/abs/x")
    assert store.locate("builtin:tiny").parent == tmp_path / "home" / "builtin"
    assert not store.is_downloaded("builtin:nope")
    assert not store.is_downloaded("org/name")


def test_each_pinned_revision_of_a_repo_has_its_own_directory(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    main = store.locate("org/name", "main")
    v1 = store.locate("org/name", "v1.0")
    sha = store.locate("org/name", "0123abcd" * 5)
    assert len({main, v1, sha}) == 3
    assert v1.name == "org--name@v1.0"
    assert store.locate("org/name", "refs/pr/1").name == "org--name@refs_pr_1"


def test_builtin_models_are_built_into_the_store(tmp_path: Path) -> None:
    built: list[str] = []

    def build(name: str, cache: Path) -> Path:
        built.append(name)
        return make_model_dir(cache / "tiny-x", 10)

    store = ModelStore(tmp_path / "home", build=build)
    assert store.fetch("builtin:tiny", "main") == tmp_path / "home" / "builtin" / "tiny-x"
    assert built == ["tiny"]


def hub_model(weights: int) -> dict[str, bytes]:
    config = {**QWEN3_8B, "num_hidden_layers": 2, "max_position_embeddings": 1024}
    return {
        "model.safetensors": safetensors_bytes({"w": weights}),
        "config.json": json.dumps(config).encode(),
    }


async def test_a_hub_model_is_downloaded_then_loaded(world: World, hub_server: HubServer) -> None:
    hub_server.add_repo("org/small", hub_model(256 * 1024))
    world.write(
        "1GiB", small={"source": "org/small", "engine": {"prompt_cache_bytes": 0, "max_batch": 2}}
    )
    r = world.build()
    events = r.subscribe()
    await r.start()
    await until(lambda: world.ready("small"), timeout_s=10)
    assert (world.home / "models" / "org--small" / "model.safetensors").is_file()
    kinds = {(ev["type"], ev.get("action")) for ev in events.pending()}
    assert ("action", "Download") in kinds and ("download_progress", None) in kinds
    fp = world.r.status()["models"]["small"]["footprint"]
    assert fp["kv_bytes"] == 2 * 2 * 8 * 128 * 2 * 1024 * 2


async def test_a_hub_model_too_big_for_the_budget_is_not_downloaded(
    world: World, hub_server: HubServer
) -> None:
    hub_server.add_repo("org/big", hub_model(256 * 1024))
    world.write("16MiB", big={"source": "org/big", "engine": {"prompt_cache_bytes": 0}})
    await world.build().start()
    await until(
        lambda: world.condition("big", "Downloaded")["reason"] == "ExceedsBudget", timeout_s=10
    )
    assert hub_server.served("model.safetensors") == []
    assert "the whole budget is 16.0 MiB" in world.condition("big", "Downloaded")["message"]


async def test_a_missing_hub_repo_quarantines_the_model_with_the_reason(
    world: World, hub_server: HubServer
) -> None:
    world.write("1GiB", nope={"source": "org/nope"})
    await world.build().start()
    await until(lambda: world.condition("nope", "Quarantined")["status"], timeout_s=10)
    assert world.condition("nope", "Quarantined")["reason"] == "DownloadFailed"
    assert "RepoNotFound" in world.condition("nope", "Quarantined")["message"]


def test_only_files_lmx_downloaded_count_as_on_disk_and_are_deleted(tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "home")
    path = store.locate("org/m")
    path.mkdir(parents=True)
    (path / "notes.txt").write_text("mine")
    assert not store.on_disk("org/m")
    (path / ".lmx-partial").mkdir()
    (path / ".lmx-partial" / "model.safetensors.abc.incomplete").write_bytes(b"x" * 10)
    assert store.on_disk("org/m")
    assert store.delete("org/m") == 10
    assert not store.on_disk("org/m") and (path / "notes.txt").read_text() == "mine"


def test_a_delete_left_unfinished_at_start_is_logged_and_the_store_starts_anyway(
    tmp_path: Path,
) -> None:
    store = ModelStore(tmp_path / "home")
    path = store.locate("org/m")
    aside = path.with_name(".org--m.deleting")  # a cut delete's, holding a file of the person's
    aside.mkdir(parents=True)
    (aside / "notes.txt").write_text("mine")
    path.mkdir()
    (path / "other.txt").write_text("also mine")  # where it would go back to
    with capture_logs() as logs:
        store.finish_deletes()
    assert [e["event"] for e in logs] == ["model_delete_unfinished"]
    assert (aside / "notes.txt").read_text() == "mine"


def test_a_builtin_model_missing_a_file_is_not_downloaded(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    store = ModelStore(tmp_path / "home")
    path = store.locate("builtin:tiny")
    shutil.copytree(tiny_model_dir, path)
    assert store.is_downloaded("builtin:tiny")
    (path / "tokenizer.json").unlink()  # config.json and the weights are there: it still won't load
    assert not store.is_downloaded("builtin:tiny")
    # Built again in its place (a cut delete of an lmx before this one left such a directory).
    store.fetch("builtin:tiny", "main")
    assert store.is_downloaded("builtin:tiny") and (path / "tokenizer.json").is_file()


def test_a_builtin_delete_cut_by_a_crash_leaves_no_model_and_the_next_start_finishes_it(
    tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = ModelStore(tmp_path / "home")
    path = store.locate("builtin:tiny")
    shutil.copytree(tiny_model_dir, path)
    kill_at_unlink(monkeypatch, 3)
    with pytest.raises(Killed):
        store.delete("builtin:tiny")
    monkeypatch.undo()

    after = ModelStore(tmp_path / "home")  # the next process
    assert not after.is_downloaded("builtin:tiny") and not after.on_disk("builtin:tiny")
    after.finish_deletes()
    assert list(path.parent.iterdir()) == []
