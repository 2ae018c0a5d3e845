"""lmx.runtime.downloads against a local Hub (tests/hubserver.py) with huggingface_hub's real
client: resolve, download, resume, verification, disk admission, errors, progress, prune."""

from __future__ import annotations

import json
import random
import threading
from pathlib import Path

import pytest
from huggingface_hub import constants, hf_hub_download

from lmx.errors import PermanentError, TemporaryError
from lmx.runtime import downloads
from lmx.runtime.downloads import (
    DISK_MARGIN_BYTES,
    MANIFEST_NAME,
    PARTIAL_DIR,
    DownloadCancelled,
    GatedRepo,
    InsufficientDisk,
    OfflineError,
    ProgressEvent,
    RepoNotFound,
    RevisionNotFound,
    TransientDownloadError,
    UnsupportedRepo,
    VerificationError,
    check_disk,
    download,
    fetch_file,
    is_complete,
    prune,
    read_manifest,
    resolve,
)
from tests.crash import Killed, kill_at_unlink
from tests.hubserver import HubServer

REPO = "lmx-test/tiny"
WEIGHTS = "model.safetensors"


def model_files(seed: int = 0, weights_bytes: int = 256 * 1024) -> dict[str, bytes]:
    rng = random.Random(seed)
    return {
        WEIGHTS: rng.randbytes(weights_bytes),
        "config.json": json.dumps({"model_type": "llama", "seed": seed}).encode(),
        "tokenizer.json": json.dumps({"version": "1.0", "pad": rng.random()}).encode(),
        "README.md": b"# tiny\n",
        "pytorch_model.bin": rng.randbytes(1000),
        "original/consolidated.pth": rng.randbytes(1000),
    }


def test_resolves_downloads_verifies_and_a_second_download_fetches_nothing(
    hub_server: HubServer, tmp_path: Path
) -> None:
    files = model_files()
    commit = hub_server.add_repo(REPO, files)

    snap = resolve(REPO, "main")

    assert snap.commit == commit
    assert [f.path for f in snap.files] == ["config.json", WEIGHTS, "tokenizer.json"]
    weights = next(f for f in snap.files if f.path == WEIGHTS)
    assert weights.sha256 is not None and weights.size == len(files[WEIGHTS])
    assert all(f.git_oid is not None for f in snap.files if f.path.endswith(".json"))
    assert snap.total_bytes == sum(len(files[f.path]) for f in snap.files)

    dest = tmp_path / "models" / "tiny"
    result = download(snap, dest)

    assert set(result.fetched) == {"config.json", WEIGHTS, "tokenizer.json"}
    assert result.bytes_fetched == snap.total_bytes
    for f in snap.files:
        assert (dest / f.path).read_bytes() == files[f.path]
    assert not (dest / "README.md").exists() and not (dest / PARTIAL_DIR).exists()
    manifest = json.loads((dest / MANIFEST_NAME).read_text())
    assert (manifest["repo_id"], manifest["commit"]) == (REPO, commit)
    assert read_manifest(dest) == snap
    assert is_complete(dest, snap) and is_complete(dest)

    before = len(hub_server.requests)
    again = download(snap, dest)

    assert again.fetched == () and again.bytes_fetched == 0
    assert len(hub_server.requests) == before


def test_resumes_with_a_range_request_when_the_connection_drops_mid_file(
    hub_server: HubServer, tmp_path: Path
) -> None:
    files = model_files()
    hub_server.add_repo(REPO, files)
    snap = resolve(REPO)
    hub_server.drop_after(WEIGHTS, 100_000)

    download(snap, tmp_path)

    first, second = hub_server.served(WEIGHTS)
    assert first.range is None and second.range == "bytes=65536-" and second.status == 206
    assert hub_server.sleeps == [1]  # huggingface_hub backed off once before resuming
    assert (tmp_path / WEIGHTS).read_bytes() == files[WEIGHTS]


def test_a_connection_that_keeps_dropping_raises_transient_error_and_the_next_call_resumes(
    hub_server: HubServer, tmp_path: Path
) -> None:
    files = model_files()
    hub_server.add_repo(REPO, files)
    snap = resolve(REPO)
    hub_server.drop_after(WEIGHTS, 100_000, times=None)

    with pytest.raises(TransientDownloadError, match=rf"{REPO}@main .*{WEIGHTS}") as caught:
        download(snap, tmp_path)

    assert isinstance(caught.value, TemporaryError)
    assert not is_complete(tmp_path, snap) and not (tmp_path / MANIFEST_NAME).exists()
    attempts = hub_server.served(WEIGHTS)
    assert len(attempts) <= 7  # bounded: huggingface_hub retries 5 times after the last progress
    assert hub_server.sleeps == [1] * (len(attempts) - 1)  # each retry waited

    hub_server.clear_faults()
    result = download(snap, tmp_path)

    assert result.fetched == (WEIGHTS, "tokenizer.json")  # config.json was verified already
    assert len(hub_server.served("config.json")) == 1
    assert hub_server.served(WEIGHTS)[-1].range == "bytes=65536-"
    assert (tmp_path / WEIGHTS).read_bytes() == files[WEIGHTS]
    assert is_complete(tmp_path, snap)


@pytest.mark.parametrize("name", [WEIGHTS, "config.json"])  # sha256 (LFS) and git blob id
def test_a_corrupted_file_is_fetched_again_and_never_accepted(
    hub_server: HubServer, tmp_path: Path, name: str
) -> None:
    files = model_files()
    hub_server.add_repo(REPO, files)
    snap = resolve(REPO)
    hub_server.corrupt(name)

    download(snap, tmp_path)

    assert len(hub_server.served(name)) == 2
    assert (tmp_path / name).read_bytes() == files[name]


def test_a_file_that_is_always_corrupt_raises_verification_error_and_writes_no_manifest(
    hub_server: HubServer, tmp_path: Path
) -> None:
    hub_server.add_repo(REPO, model_files())
    snap = resolve(REPO)
    hub_server.corrupt(WEIGHTS, times=None)

    with pytest.raises(VerificationError, match=WEIGHTS) as caught:
        download(snap, tmp_path)

    assert isinstance(caught.value, PermanentError)
    assert len(hub_server.served(WEIGHTS)) == 2
    assert not (tmp_path / MANIFEST_NAME).exists() and not (tmp_path / WEIGHTS).exists()
    assert not is_complete(tmp_path)


def test_a_repo_larger_than_free_disk_is_refused_before_any_byte(
    hub_server: HubServer, tmp_path: Path
) -> None:
    hub_server.add_repo(REPO, model_files())
    snap = resolve(REPO)
    dest = tmp_path / "models" / "tiny"
    small_disk = snap.total_bytes + DISK_MARGIN_BYTES - 1

    with pytest.raises(InsufficientDisk, match=REPO):
        download(snap, dest, disk_free=lambda _: small_disk)

    assert hub_server.count(kind="resolve") == 0 and hub_server.count(kind="cdn") == 0
    assert not dest.exists()
    assert check_disk(snap, dest, disk_free=lambda _: small_disk + 1) == snap.total_bytes


def test_server_errors_raise_transient_errors_after_a_bounded_number_of_requests(
    hub_server: HubServer, tmp_path: Path
) -> None:
    hub_server.add_repo(REPO, model_files())
    hub_server.fail_next(1000)

    with pytest.raises(TransientDownloadError, match="HTTP 500"):
        resolve(REPO)
    assert len(hub_server.requests) == 1

    hub_server.clear_faults()
    snap = resolve(REPO)
    hub_server.fail_next(1000, path_contains="/resolve/")
    with pytest.raises(TransientDownloadError, match="HTTP 500") as caught:
        download(snap, tmp_path)

    assert caught.value.file == "config.json" and caught.value.delay_s > 0
    assert hub_server.count(kind="resolve") == 1 and hub_server.sleeps == []


def test_offline_mode_with_a_missing_model_raises_offline_error(
    hub_server: HubServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    hub_server.add_repo(REPO, model_files())
    snap = resolve(REPO)
    download(snap, tmp_path / "present")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    before = len(hub_server.requests)

    with pytest.raises(OfflineError):
        resolve(REPO)
    with pytest.raises(OfflineError, match=REPO):
        download(snap, tmp_path / "missing")
    assert download(snap, tmp_path / "present").fetched == ()  # complete: no Hub needed
    assert len(hub_server.requests) == before


def test_an_unreachable_hub_raises_offline_error(hub_server: HubServer, tmp_path: Path) -> None:
    hub_server.add_repo(REPO, model_files())
    snap = resolve(REPO)
    hub_server.stop()

    with pytest.raises(OfflineError, match="cannot reach the Hub"):
        resolve(REPO)
    with pytest.raises(OfflineError, match=r"config\.json"):
        download(snap, tmp_path)
    assert hub_server.sleeps == [1] * 5  # huggingface_hub's bounded reconnect attempts


def test_missing_repo_revision_and_gated_access_are_permanent_errors(
    hub_server: HubServer, tmp_path: Path
) -> None:
    hub_server.add_repo(REPO, model_files())
    hub_server.add_repo("lmx-test/gated", model_files(), token="hf_granted", gated=True)
    hub_server.add_repo("lmx-test/no-weights", {"config.json": b"{}", "model.bin": b"x"})

    with pytest.raises(RepoNotFound, match="lmx-test/nope@main"):
        resolve("lmx-test/nope")
    with pytest.raises(RevisionNotFound, match=f"{REPO}@v9"):
        resolve(REPO, "v9")
    with pytest.raises(UnsupportedRepo):
        resolve("lmx-test/no-weights")
    gated = resolve("lmx-test/gated")  # metadata is public, files are not
    with pytest.raises(GatedRepo, match=r"config\.json") as caught:
        download(gated, tmp_path)
    assert isinstance(caught.value, PermanentError)
    download(gated, tmp_path, token="hf_granted")
    assert is_complete(tmp_path, gated)


@pytest.mark.parametrize("source", ["argument", "HF_TOKEN", "stored login"])
def test_the_token_comes_from_the_argument_then_hf_token_then_the_stored_login(
    hub_server: HubServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, source: str
) -> None:
    hub_server.add_repo(REPO, model_files(), token="hf_secret")
    sources = ["argument", "HF_TOKEN", "stored login"]
    # The chosen source holds the right token; every source of lower priority holds a wrong one.
    held = {s: "hf_secret" if s == source else "hf_wrong" for s in sources[sources.index(source) :]}
    if "HF_TOKEN" in held:
        monkeypatch.setenv("HF_TOKEN", held["HF_TOKEN"])
    Path(constants.HF_TOKEN_PATH).write_text(held["stored login"])
    token = held.get("argument")

    download(resolve(REPO, token=token), tmp_path, token=token)

    hub = [s for s in hub_server.requests if s.kind != "cdn"]
    assert hub and all(s.headers.get("authorization") == "Bearer hf_secret" for s in hub)
    cdn = [s for s in hub_server.requests if s.kind == "cdn"]
    assert cdn and all("authorization" not in s.headers for s in cdn)  # never leaves the Hub


def test_progress_events_increase_are_throttled_and_end_at_the_total(
    hub_server: HubServer, tmp_path: Path
) -> None:
    hub_server.add_repo(REPO, model_files(weights_bytes=1 << 20))
    snap = resolve(REPO)
    hub_server.bytes_per_s = 4 << 20  # ~0.25 s for the weights
    events: list[ProgressEvent] = []

    result = download(snap, tmp_path, on_progress=events.append)

    done = [e.bytes_done for e in events]
    assert len(events) >= 2 and done == sorted(done)
    assert len(events) <= result.elapsed_s / downloads.PROGRESS_INTERVAL_S + 2
    last = events[-1]
    assert (last.bytes_done, last.bytes_total, last.eta_s) == (snap.total_bytes,) * 2 + (0.0,)
    assert last.repo_id == REPO and last.rate_bps > 0


def test_cancelling_keeps_the_partial_file_and_the_next_call_resumes_it(
    hub_server: HubServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    files = model_files(weights_bytes=1 << 20)
    hub_server.add_repo(REPO, files)
    snap = resolve(REPO)
    monkeypatch.setattr(downloads, "PROGRESS_INTERVAL_S", 0.0)  # an event per received chunk
    cancel = threading.Event()

    def stop_midway(event: ProgressEvent) -> None:
        if event.file == WEIGHTS and event.bytes_done > 200_000:
            cancel.set()

    with pytest.raises(DownloadCancelled):
        download(snap, tmp_path, cancel=cancel, on_progress=stop_midway)
    partial = next((tmp_path / PARTIAL_DIR).glob(f"{WEIGHTS}.*.incomplete"))
    kept = partial.stat().st_size
    assert 0 < kept < len(files[WEIGHTS]) and not is_complete(tmp_path)

    download(snap, tmp_path)

    assert hub_server.served(WEIGHTS)[-1].range == f"bytes={kept}-"
    assert (tmp_path / WEIGHTS).read_bytes() == files[WEIGHTS]


def test_a_cancel_is_taken_within_a_chunk_of_ours_and_keeps_what_came_before_it(
    hub_server: HubServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # huggingface_hub's own chunk (10 MiB, which the fixture lowers): a slow download took no
    # cancel until one had come whole, and wrote nothing of the one it came with.
    monkeypatch.setattr(constants, "DOWNLOAD_CHUNK_SIZE", 10 << 20)
    monkeypatch.setattr(downloads, "CHUNK_BYTES", 64 << 10)
    monkeypatch.setattr(downloads, "PROGRESS_INTERVAL_S", 0.0)
    files = model_files(weights_bytes=1 << 20)
    hub_server.add_repo(REPO, files)
    snap = resolve(REPO)
    hub_server.bytes_per_s = 1 << 20  # a second for the weights
    cancel = threading.Event()
    began: list[int] = []  # the bytes done as the weights began

    def stop_early(event: ProgressEvent) -> None:
        if event.file == WEIGHTS:
            began[:] = began or [event.bytes_done]
            if event.bytes_done - began[0] > 300_000:
                cancel.set()

    with pytest.raises(DownloadCancelled):
        download(snap, tmp_path, cancel=cancel, on_progress=stop_early)
    kept = next((tmp_path / PARTIAL_DIR).glob(f"{WEIGHTS}.*.incomplete")).stat().st_size
    assert 200_000 < kept < 600_000


def test_a_file_fetched_ahead_is_verified_and_the_download_reuses_it_without_a_request(
    hub_server: HubServer, tmp_path: Path
) -> None:
    files = model_files()
    hub_server.add_repo(REPO, files)
    snap = resolve(REPO)
    hub_server.corrupt("config.json")  # verified ahead too: the first copy is refused

    ahead = fetch_file(snap, "config.json", tmp_path)

    assert ahead.read_bytes() == files["config.json"] and not is_complete(tmp_path)
    result = download(snap, tmp_path)
    assert "config.json" not in result.fetched and len(hub_server.served("config.json")) == 2
    assert fetch_file(snap, "config.json", tmp_path) == tmp_path / "config.json"
    assert len(hub_server.served("config.json")) == 2
    with pytest.raises(ValueError, match=r"README\.md"):
        fetch_file(snap, "README.md", tmp_path)


def test_a_new_commit_reuses_unchanged_files_and_removes_dropped_ones(
    hub_server: HubServer, tmp_path: Path
) -> None:
    old_files = model_files() | {"merges.txt": b"a b\n"}
    old = resolve(REPO, hub_server.add_repo(REPO, old_files))
    download(old, tmp_path)
    new_files = old_files | {"config.json": b'{"model_type": "qwen3"}'}
    del new_files["merges.txt"]
    new = resolve(REPO, hub_server.add_repo(REPO, new_files))

    result = download(new, tmp_path)

    assert result.fetched == ("config.json",)
    assert not (tmp_path / "merges.txt").exists()
    assert is_complete(tmp_path, new) and not is_complete(tmp_path, old)
    assert resolve(REPO, old.commit) == old  # the old commit stays pinnable


def test_a_crash_while_moving_to_a_new_commit_leaves_the_old_files_for_prune_to_find(
    hub_server: HubServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    old_files = model_files() | {"merges.txt": b"a b\n"}
    download(resolve(REPO, hub_server.add_repo(REPO, old_files)), tmp_path / "m")
    new_files = dict(old_files)
    del new_files["merges.txt"]
    new = resolve(REPO, hub_server.add_repo(REPO, new_files))
    kill_at_unlink(monkeypatch, 2)  # the manifest is gone, merges.txt not yet
    with pytest.raises(Killed):
        download(new, tmp_path / "m")
    monkeypatch.undo()
    assert (tmp_path / "m" / "merges.txt").exists() and read_manifest(tmp_path / "m") is None

    prune(tmp_path / "m")

    assert not (tmp_path / "m").exists()


def test_prune_deletes_only_what_lmx_downloaded(hub_server: HubServer, tmp_path: Path) -> None:
    hub_server.add_repo(REPO, model_files())
    snap = resolve(REPO)
    kept, gone = tmp_path / "kept", tmp_path / "gone"
    download(snap, kept)
    download(snap, gone)
    (kept / "notes.txt").write_text("mine")
    (kept / "adapters").mkdir()
    (kept / "adapters" / "adapter.safetensors").write_bytes(b"mine too")

    freed = prune(kept)
    prune(gone)

    assert freed == snap.total_bytes
    assert sorted(p.relative_to(kept).as_posix() for p in kept.rglob("*")) == [
        "adapters", "adapters/adapter.safetensors", "notes.txt",
    ]  # fmt: skip
    assert not gone.exists()
    assert prune(gone) == 0


def test_prune_removes_an_interrupted_download(hub_server: HubServer, tmp_path: Path) -> None:
    hub_server.add_repo(REPO, model_files())
    snap = resolve(REPO)
    hub_server.drop_after(WEIGHTS, 100_000, times=None)
    with pytest.raises(TransientDownloadError):
        download(snap, tmp_path / "m")
    assert (tmp_path / "m" / "config.json").exists()

    prune(tmp_path / "m")

    assert not (tmp_path / "m").exists()


def test_the_hub_server_speaks_what_hf_hub_download_expects(
    hub_server: HubServer, tmp_path: Path
) -> None:
    files = model_files()
    commit = hub_server.add_repo(REPO, files)

    for name in (WEIGHTS, "config.json"):  # redirected LFS file, and a file served directly
        path = hf_hub_download(REPO, name, local_dir=tmp_path)
        assert Path(path).read_bytes() == files[name]
    heads = [s for s in hub_server.requests if s.method == "HEAD"]
    assert [s.status for s in heads] == [302, 200]
    assert hf_hub_download(REPO, WEIGHTS, revision=commit, cache_dir=tmp_path / "cache")
