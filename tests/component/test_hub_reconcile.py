"""Hub models through the reconcile loop, on a local Hub with faults (tests/hubserver.py) and the
real huggingface_hub client: resume after drops and restarts, verification, disk and memory
admission, backoff, offline mode, bounded concurrency and prune. Engines are fakes that record,
at each load, whether the model's directory held a complete download."""

from __future__ import annotations

import asyncio
import json
import random
import struct
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from huggingface_hub import constants

from lmx.reconciler.loop import Reconciler
from lmx.reconciler.settings import ReconcilerSettings
from lmx.runtime import downloads
from lmx.runtime.downloads import (
    MANIFEST_NAME,
    PARTIAL_DIR,
    InsufficientDisk,
    OfflineError,
    TransientDownloadError,
    is_complete,
)
from lmx.runtime.engine import LoadConfig
from lmx.runtime.registry import EngineRegistry
from lmx.runtime.store import ModelStore
from tests.component.reconciler_world import FAST, World, settle, until
from tests.crash import Killed, kill_at_unlink
from tests.fakes import FakeEngine, FakeEngines
from tests.hubserver import HubServer

WEIGHTS = "model.safetensors"
CONFIG = {  # small KV: 2 layers x 2 KV heads x 16 dims, bf16, 256 positions
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "hidden_size": 64,
    "max_position_embeddings": 256,
    "torch_dtype": "bfloat16",
}


def repo_files(weights_bytes: int = 256 * 1024, seed: int = 0) -> dict[str, bytes]:
    """A repo the fake engine can load: a safetensors file of random bytes, config, tokenizer."""
    rng = random.Random(seed)
    header = json.dumps(
        {"w": {"dtype": "U8", "shape": [weights_bytes], "data_offsets": [0, weights_bytes]}}
    ).encode()
    return {
        WEIGHTS: struct.pack("<Q", len(header)) + header + rng.randbytes(weights_bytes),
        "config.json": json.dumps({**CONFIG, "seed": seed}).encode(),
        "tokenizer.json": json.dumps({"version": "1.0", "seed": seed}).encode(),
    }


def hub(repo: str, want: str = "resident", **extra: Any) -> dict[str, Any]:
    return {
        "source": repo,
        "want": want,
        "engine": {"prompt_cache_bytes": 0, "max_batch": 1},
        **extra,
    }


@dataclass
class CheckingEngines(FakeEngines):
    """Fake engines that note, as each engine is made (just before its load), whether the model's
    directory held a complete, manifest-backed download."""

    complete_at_load: list[tuple[str, bool]] = field(default_factory=list)

    def __call__(self, config: LoadConfig) -> FakeEngine:
        self.complete_at_load.append((config.model_id, is_complete(config.path)))
        return super().__call__(config)


@dataclass
class HubWorld(World):
    engines: CheckingEngines = field(default_factory=CheckingEngines)
    disk_free_bytes: int | None = None  # None: the real free space

    def build(self, **overrides: Any) -> Reconciler:
        # World.build, with a store whose free disk the test controls.
        settings = ReconcilerSettings(home=self.home, **{**FAST, **self.settings, **overrides})
        self.registry = EngineRegistry(self.engines)
        store = ModelStore(self.home, base_dir=self.tmp, disk_free=self._disk_free)
        self.reconciler = Reconciler(
            settings,
            registry=self.registry,
            store=store,
            memory=self.engines.memory.probe(),
            config_path=self.config_path,
        )
        return self.reconciler

    def _disk_free(self, path: Path) -> int:
        free = self.disk_free_bytes
        return downloads.free_bytes(path) if free is None else free

    def write_doc(self, doc: dict[str, Any]) -> None:
        self.write_text(yaml.safe_dump({"memory": {"budget": "1GiB"}, **doc}))

    def model_path(self, repo: str) -> Path:
        return self.home / "models" / repo.replace("/", "--")

    def status_of(self, mid: str) -> dict[str, Any]:
        models: dict[str, Any] = self.r.status()["models"]
        return models.get(mid, {})


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[HubWorld]:
    w = HubWorld(tmp_path)
    yield w
    if w.reconciler is not None:
        async with asyncio.timeout(10):
            await w.reconciler.stop()


async def next_event(events: AsyncIterator[dict[str, Any]], **match: Any) -> dict[str, Any]:
    async with asyncio.timeout(10):
        async for ev in events:
            if all(ev.get(k) == v for k, v in match.items()):
                return ev
    raise AssertionError("the event stream ended")


def only_complete_loads(world: HubWorld) -> bool:
    return all(done for _, done in world.engines.complete_at_load)


async def test_a_dropped_connection_is_resumed_by_the_next_reconcile_without_refetching_files(
    world: HubWorld, hub_server: HubServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(TransientDownloadError, "default_delay_s", 0.3)  # the retry, soon
    files = repo_files(512 * 1024)
    commit = hub_server.add_repo("org/m", files)
    hub_server.drop_after(WEIGHTS, 200_000, times=None)  # every attempt: hf's retries give up
    world.write_doc({"models": {"m": hub("org/m")}})
    r = world.build()
    events = r.subscribe()
    await r.start()

    failed = await next_event(events, type="action", action="Download", result="failed")
    assert "TransientDownloadError" in failed["message"] and WEIGHTS in failed["message"]
    assert world.engines.complete_at_load == []  # the partial model was never loaded
    hub_server.clear_faults()  # before the retry, 0.3 s after the failure
    await until(lambda: world.ready("m"), timeout_s=10)

    resumed = hub_server.served(WEIGHTS)[-1]
    assert resumed.status == 206 and resumed.range is not None and resumed.range != "bytes=0-"
    # Each small file crossed the wire once, though both reconciles resolved and estimated.
    assert len(hub_server.served("config.json")) == 1
    assert len(hub_server.served("tokenizer.json")) == 1
    assert (world.model_path("org/m") / WEIGHTS).read_bytes() == files[WEIGHTS]
    assert world.engines.complete_at_load == [("m", True)]
    assert world.status_of("m")["commit"] == commit


async def test_a_download_cut_by_a_restart_resumes_where_it_stopped(
    world: HubWorld, hub_server: HubServer
) -> None:
    files = repo_files(1 << 20)
    hub_server.add_repo("org/m", files)
    hub_server.bytes_per_s = 2 << 20  # ~0.5 s for the weights
    world.write_doc({"models": {"m": hub("org/m")}})
    await world.build().start()
    partial_dir = world.model_path("org/m") / PARTIAL_DIR

    def partial_bytes() -> int:
        return sum(p.stat().st_size for p in partial_dir.glob(f"{WEIGHTS}.*.incomplete"))

    await until(lambda: partial_bytes() >= 128 * 1024, timeout_s=10)
    await world.r.stop()  # as a crash leaves it: the partial file, the journal, no manifest
    kept = partial_bytes()
    assert 0 < kept < len(files[WEIGHTS]) and not is_complete(world.model_path("org/m"))
    hub_server.clear_faults()

    hub_server.bytes_per_s = 1 << 20  # ~1 s for the rest: status follows it as it goes
    await world.build().start()  # the next process, on the same LMX_HOME

    def progress() -> str:
        conditions = world.status_of("m").get("conditions", [])
        return next((c["message"] for c in conditions if c["type"] == "Downloaded"), "")

    # From where it stopped (not 0%), as of now, with no reconcile pass meanwhile.
    start = int(100 * kept / len(files[WEIGHTS])) - 1

    def resumed() -> str | None:
        m = progress()
        return m if m.endswith("/s") and int(m.split("%")[0]) > start else None

    assert "of 1.0 MiB" in await until(resumed)
    await until(lambda: world.ready("m"), timeout_s=10)

    assert hub_server.served(WEIGHTS)[-1].range == f"bytes={kept}-"
    assert len(hub_server.served("config.json")) == 1
    assert world.engines.complete_at_load == [("m", True)]


async def test_a_corrupted_file_is_fetched_again_and_only_verified_bytes_are_loaded(
    world: HubWorld, hub_server: HubServer
) -> None:
    files = repo_files()
    hub_server.add_repo("org/m", files)
    hub_server.corrupt(WEIGHTS)  # the first response only
    world.write_doc({"models": {"m": hub("org/m")}})
    await world.build().start()
    await until(lambda: world.ready("m"), timeout_s=10)

    assert len(hub_server.served(WEIGHTS)) == 2
    assert (world.model_path("org/m") / WEIGHTS).read_bytes() == files[WEIGHTS]
    assert world.engines.complete_at_load == [("m", True)]


async def test_a_file_corrupt_on_every_fetch_quarantines_the_model_and_is_never_loaded(
    world: HubWorld, hub_server: HubServer
) -> None:
    hub_server.add_repo("org/m", repo_files())
    hub_server.corrupt(WEIGHTS, times=None)
    world.write_doc({"models": {"m": hub("org/m")}})
    await world.build().start()
    await until(lambda: world.condition("m", "Quarantined")["status"], timeout_s=10)

    assert "VerificationError" in world.condition("m", "Quarantined")["message"]
    assert world.condition("m", "Downloaded")["status"] is False
    path = world.model_path("org/m")
    assert not (path / WEIGHTS).exists() and not (path / MANIFEST_NAME).exists()
    assert world.engines.history == []


async def test_a_repo_larger_than_free_disk_is_blocked_insufficient_disk_until_space_is_freed(
    world: HubWorld, hub_server: HubServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(InsufficientDisk, "default_delay_s", 0.02)  # many retries, quickly
    hub_server.add_repo("org/m", repo_files())
    world.disk_free_bytes = 10 << 20  # under the weights plus the 1 GiB margin
    world.write_doc({"models": {"m": hub("org/m")}})
    await world.build().start()  # FAST: quarantine after 3 failures, for other reasons

    def blocked() -> dict[str, Any] | None:  # between two retries (each briefly `Downloading`)
        cond = world.condition("m", "Downloaded")
        failures = world.status_of("m").get("failures", 0)
        return cond if failures > 3 and cond["reason"] == "InsufficientDisk" else None

    downloaded = await until(blocked, timeout_s=10)
    assert downloaded["status"] is False and "10485760 free" in downloaded["message"]
    assert world.condition("m", "Quarantined")["status"] is False  # it waits for space
    assert hub_server.count(kind="resolve") == hub_server.count(kind="cdn") == 0
    assert not world.model_path("org/m").exists()

    world.disk_free_bytes = None
    await until(lambda: world.ready("m"), timeout_s=10)
    assert world.engines.complete_at_load == [("m", True)]


async def test_a_model_whose_weights_alone_exceed_the_budget_is_refused_before_any_file_request(
    world: HubWorld, hub_server: HubServer
) -> None:
    hub_server.add_repo("org/big", repo_files())
    world.write_text(
        yaml.safe_dump({"memory": {"budget": "16MiB"}, "models": {"big": hub("org/big")}})
    )
    await world.build().start()
    await until(
        lambda: world.condition("big", "Downloaded")["reason"] == "ExceedsBudget", timeout_s=10
    )

    assert hub_server.count(kind="info") >= 1
    assert hub_server.count(kind="resolve") == hub_server.count(kind="cdn") == 0
    assert not world.model_path("org/big").exists()


async def test_server_errors_back_off_instead_of_retrying_in_a_tight_loop(
    world: HubWorld, hub_server: HubServer
) -> None:
    hub_server.add_repo("org/m", repo_files())
    hub_server.fail_next(1000, status=500)
    world.write_doc({"models": {"m": hub("org/m")}})
    r = world.build()
    events = r.subscribe()
    await r.start()
    await next_event(events, type="action", action="Download", result="failed")
    await asyncio.sleep(1.0)

    assert hub_server.count() == 1  # one resolve, then the 5 s an HTTP 500 asks for
    ready = world.condition("m", "Ready")
    assert ready["reason"] == "BackingOff" and ready["message"].startswith("retrying in ")
    assert float(ready["message"].removeprefix("retrying in ").removesuffix("s")) > 4
    degraded = world.condition("m", "Degraded")
    assert degraded["reason"] == "DownloadFailed" and "HTTP 500" in degraded["message"]


async def test_retry_after_zero_still_backs_off_exponentially(
    world: HubWorld, hub_server: HubServer
) -> None:
    hub_server.add_repo("org/m", repo_files())
    hub_server.fail_next(1000, status=503, retry_after=0)
    world.settings.update(max_failures=100, backoff_base_s=0.05, backoff_max_s=0.4)
    world.write_doc({"models": {"m": hub("org/m")}})
    await world.build().start()
    await asyncio.sleep(1.2)

    # Retries at about 0, 0.05, 0.15, 0.35, 0.75 and 1.15 s: a tight loop would make hundreds.
    assert 3 <= hub_server.count() <= 8
    assert world.condition("m", "Degraded")["reason"] == "DownloadFailed"
    hub_server.clear_faults()
    await until(lambda: world.ready("m"), timeout_s=10)


async def test_a_hub_that_does_not_answer_times_out_and_backs_off(
    world: HubWorld, hub_server: HubServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(constants, "HF_HUB_ETAG_TIMEOUT", 0.2)
    hub_server.add_repo("org/m", repo_files())
    hub_server.latency_s = 1.0  # longer than the timeout: the resolve must not wait it out
    world.write_doc({"models": {"m": hub("org/m")}})
    r = world.build()
    events = r.subscribe()
    await r.start()

    failed = await next_event(events, type="action", action="Download", result="failed")
    assert "ReadTimeout" in failed["message"] and failed["duration_s"] < 0.9
    await until(lambda: world.condition("m", "Ready")["reason"] == "BackingOff")
    assert hub_server.max_in_flight == 1  # that one request, still unanswered: no retry yet


async def test_offline_a_missing_model_is_blocked_without_requests_and_a_downloaded_one_loads(
    world: HubWorld, hub_server: HubServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    hub_server.add_repo("org/here", repo_files(seed=1))
    hub_server.add_repo("org/away", repo_files(seed=2))
    store = ModelStore(world.home)
    await asyncio.to_thread(store.fetch, "org/here", "main")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(OfflineError, "default_delay_s", 0.05)  # retries soon, and often
    seen = len(hub_server.requests)
    world.write_doc({"models": {"here": hub("org/here"), "away": hub("org/away")}})
    await world.build().start()

    await until(lambda: world.ready("here"), timeout_s=10)

    def blocked() -> dict[str, Any] | None:  # between two retries (each briefly `Downloading`)
        cond = world.condition("away", "Downloaded")
        failures = world.status_of("away").get("failures", 0)
        return cond if failures > 3 and cond["reason"] == "Offline" else None

    downloaded = await until(blocked, timeout_s=10)
    assert "HF_HUB_OFFLINE" in downloaded["message"]
    assert world.condition("away", "Quarantined")["status"] is False  # waits for the network
    assert len(hub_server.requests) == seen

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    await until(lambda: world.ready("away"), timeout_s=10)
    assert world.engines.complete_at_load == [("here", True), ("away", True)]


async def test_at_most_the_configured_number_of_downloads_run_at_once(
    world: HubWorld, hub_server: HubServer
) -> None:
    for name in "abc":
        hub_server.add_repo(f"org/{name}", repo_files(256 * 1024, seed=ord(name)))
    hub_server.bytes_per_s = 1 << 20  # ~0.25 s per model
    models = {name: hub(f"org/{name}") for name in "abc"}
    world.write_doc({"downloads": {"concurrency": 2}, "models": models})
    r = world.build()
    await r.start()
    await until(lambda: world.condition("c", "Downloaded").get("message") == "queued", timeout_s=10)
    await until(lambda: all(world.ready(name) for name in "abc"), timeout_s=10)

    assert hub_server.max_in_flight == 2
    assert only_complete_loads(world)


async def test_lowering_the_concurrency_mid_download_never_runs_more_than_either_limit(
    world: HubWorld, hub_server: HubServer
) -> None:
    for name in "abc":
        hub_server.add_repo(f"org/{name}", repo_files(512 * 1024, seed=ord(name)))
    hub_server.bytes_per_s = 1 << 20  # ~0.5 s per model
    two = {name: hub(f"org/{name}") for name in "ab"}
    world.write_doc({"downloads": {"concurrency": 2}, "models": two})
    await world.build().start()
    await until(lambda: hub_server.count(kind="cdn") >= 2, timeout_s=10)  # a and b fetch weights

    world.write_doc({"downloads": {"concurrency": 1}, "models": {**two, "c": hub("org/c")}})
    await until(lambda: all(world.ready(name) for name in "abc"), timeout_s=10)

    assert hub_server.max_in_flight == 2  # c waited for both, not for a slot of its own


async def test_a_delete_cut_by_a_crash_is_finished_by_the_next_process(
    world: HubWorld, hub_server: HubServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    hub_server.add_repo("org/m", repo_files())
    world.write_doc({"models": {"m": hub("org/m")}})
    await world.build().start()
    await until(lambda: world.ready("m"), timeout_s=10)
    await world.r.stop()
    path = world.model_path("org/m")
    (path / "notes.txt").write_text("mine")
    kill_at_unlink(monkeypatch, 3)  # after two of the model's files
    with pytest.raises(Killed):
        ModelStore(world.home).delete("org/m")
    monkeypatch.undo()

    world.write_doc({"models": {"m": hub("org/m", "absent", prune=True)}})
    await world.build().start()  # the next process, on the same LMX_HOME
    await until(settle(world))

    assert sorted(p.name for p in world.home.joinpath("models").iterdir()) == ["org--m"]
    assert sorted(p.name for p in path.iterdir()) == ["notes.txt"]
    assert world.r.plan_now().is_empty


async def test_want_absent_with_prune_deletes_only_the_files_lmx_downloaded(
    world: HubWorld, hub_server: HubServer
) -> None:
    files = repo_files()
    hub_server.add_repo("org/m", files)
    world.write_doc({"models": {"m": hub("org/m")}})
    r = world.build()
    await r.start()
    await until(lambda: world.ready("m"), timeout_s=10)
    path = world.model_path("org/m")
    (path / "notes.txt").write_text("mine")
    events = r.subscribe()

    world.write_doc({"models": {"m": hub("org/m", "absent", prune=True)}})
    await until(lambda: not (path / WEIGHTS).exists() and not world.loaded(), timeout_s=10)
    await until(settle(world))

    assert sorted(p.name for p in path.iterdir()) == ["notes.txt"]
    deletes = [e for e in events.pending() if e["type"] == "action" and e["action"] == "Delete"]
    assert [e["result"] for e in deletes] == ["done"]
    assert world.r.plan_now().is_empty


async def test_a_download_the_journal_cannot_record_waits_until_it_can(
    world: HubWorld, hub_server: HubServer
) -> None:
    hub_server.add_repo("org/m", repo_files())
    world.write_doc({"models": {"m": hub("org/m")}})
    journal = world.home / "journal.json"
    journal.mkdir(parents=True)  # no file can be renamed over it, as none can be written
    await world.build().start()

    def waiting() -> bool:
        failed = world.status_of("m").get("failures", 0) >= 2
        return failed and world.condition("m", "Downloaded")["reason"] == "JournalUnwritable"

    await until(waiting, timeout_s=10)
    assert hub_server.count(kind="cdn") == 0 and not world.condition("m", "Quarantined")["status"]
    journal.rmdir()
    await until(lambda: world.ready("m"), timeout_s=15)
