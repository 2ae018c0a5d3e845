"""Hub downloads: pin a repo revision to a commit and file list, fetch those files into a directory
lmx owns (resuming partial files, verifying every byte), and mark completion with a manifest.

Called by the model store on a worker thread: every function here blocks. All HTTP goes through
huggingface_hub's client. It never imports mlx and never decides whether to download. What lmx
records on disk (manifest, journal, partials, `prune`) is `download_manifest.py`; the error tree
is `download_errors.py`; both are re-exported here.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import structlog
from huggingface_hub import HfApi, constants, hf_hub_url
from huggingface_hub.file_download import http_get

# Public API (documented), but exported through a dynamic __all__ that mypy cannot read.
from huggingface_hub.utils import build_hf_headers  # type: ignore[attr-defined]
from huggingface_hub.utils.tqdm import tqdm as hf_tqdm

from lmx.runtime.download_errors import (
    AccessDenied,
    DownloadCancelled,
    DownloadError,
    GatedRepo,
    InsufficientDisk,
    OfflineError,
    RepoNotFound,
    RevisionNotFound,
    TransientDownloadError,
    UnsupportedRepo,
    VerificationError,
    translated,
)
from lmx.runtime.download_manifest import (
    MANIFEST_NAME,
    PARTIAL_DIR,
    RemoteFile,
    RepoSnapshot,
    forget_other_snapshots,
    is_complete,
    partial_path,
    prune,
    read_journal,
    read_manifest,
    size_of,
    wanted_file,
    write_journal,
    write_manifest,
)

__all__ = [  # the download API in one place: errors and on-disk records are kept beside it
    "DISK_MARGIN_BYTES",
    "MANIFEST_NAME",
    "PARTIAL_DIR",
    "AccessDenied",
    "DownloadCancelled",
    "DownloadError",
    "DownloadResult",
    "GatedRepo",
    "InsufficientDisk",
    "OfflineError",
    "ProgressEvent",
    "RemoteFile",
    "RepoNotFound",
    "RepoSnapshot",
    "RevisionNotFound",
    "TransientDownloadError",
    "UnsupportedRepo",
    "VerificationError",
    "check_disk",
    "download",
    "fetch_file",
    "free_bytes",
    "is_complete",
    "prune",
    "read_manifest",
    "remaining_bytes",
    "resolve",
    "wanted_file",
]

log = structlog.get_logger(__name__)

DISK_MARGIN_BYTES: Final = 1 << 30
PROGRESS_INTERVAL_S = 0.25  # at most ~4 progress events a second (tests lower it)
CHUNK_BYTES = 1 << 20  # the most a cancelled download loses, and its progress's step (_fetch)


# ---------------------------------------------------------------------------------------- values


@dataclass(frozen=True)
class ProgressEvent:
    """Whole-snapshot progress: `bytes_done` counts bytes on disk toward completion (resumed and
    reused ones included, so it can drop when a corrupt file is discarded); `rate_bps` only counts
    bytes transferred by this call. `file` is the file being worked on."""

    repo_id: str
    file: str
    bytes_done: int
    bytes_total: int
    rate_bps: float
    eta_s: float | None


@dataclass(frozen=True)
class DownloadResult:
    snapshot: RepoSnapshot
    path: Path
    fetched: tuple[str, ...]  # files this call transferred bytes for
    bytes_fetched: int
    elapsed_s: float


# --------------------------------------------------------------------------------------- resolve


def resolve(repo_id: str, revision: str = "main", *, token: str | None = None) -> RepoSnapshot:
    """Pin `revision` to its commit and list the files MLX needs there, with sizes and hashes.

    One Hub request, no retry (the reconciler backs off), bounded by HF_HUB_ETAG_TIMEOUT (the
    client's own default is to wait forever). `token=None` lets huggingface_hub use HF_TOKEN,
    then the stored login. Raises a DownloadError subclass.
    """
    with translated(repo_id, revision):
        info = HfApi(library_name="lmx").model_info(
            repo_id, revision=revision, files_metadata=True, token=token,
            timeout=constants.HF_HUB_ETAG_TIMEOUT,
        )  # fmt: skip
    where: dict[str, Any] = {"repo_id": repo_id, "revision": revision, "commit": info.sha}
    if not info.sha:
        raise TransientDownloadError("the Hub answered without a commit sha", **where)
    files = []
    for sibling in info.siblings or []:
        if not wanted_file(sibling.rfilename):
            continue
        lfs = sibling.lfs
        size = lfs.size if lfs is not None else sibling.size
        if size is None:
            raise TransientDownloadError("the Hub listed no size", file=sibling.rfilename, **where)
        files.append(
            RemoteFile(
                path=sibling.rfilename,
                size=size,
                sha256=lfs.sha256 if lfs is not None else None,
                git_oid=None if lfs is not None else sibling.blob_id,
            )
        )
    if not any(f.path.endswith(".safetensors") for f in files):
        raise UnsupportedRepo("no *.safetensors weights at this revision", **where)
    return RepoSnapshot(repo_id, revision, info.sha, tuple(sorted(files, key=lambda f: f.path)))


# ---------------------------------------------------------------------------------- disk, status


def free_bytes(path: Path) -> int:
    """Free bytes on the filesystem holding `path` (or its nearest existing parent)."""
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def remaining_bytes(snapshot: RepoSnapshot, dest_dir: Path | str) -> int:
    """Bytes still to fetch: files missing at their final path, less what partial files hold."""
    dest, left = Path(dest_dir), 0
    for f in snapshot.files:
        if size_of(dest / f.path) == f.size:
            continue
        partial = size_of(partial_path(dest, f)) or 0
        left += f.size - partial if partial <= f.size else f.size
    return left


def check_disk(
    snapshot: RepoSnapshot,
    dest_dir: Path | str,
    *,
    disk_free: Callable[[Path], int] = free_bytes,
    margin_bytes: int = DISK_MARGIN_BYTES,
) -> int:
    """Raise InsufficientDisk unless free space covers what is left to fetch plus `margin_bytes`.

    Returns the bytes left to fetch. `disk_free` is injectable so tests can simulate a small disk.
    """
    need = remaining_bytes(snapshot, dest_dir)
    if need == 0:
        return 0
    free = disk_free(Path(dest_dir))
    if free < need + margin_bytes:
        raise InsufficientDisk(
            f"needs {need} bytes plus a {margin_bytes}-byte margin, {free} free at {dest_dir}",
            repo_id=snapshot.repo_id, revision=snapshot.revision, commit=snapshot.commit,
        )  # fmt: skip
    return need


# -------------------------------------------------------------------------------------- download


def download(
    snapshot: RepoSnapshot,
    dest_dir: Path | str,
    *,
    token: str | None = None,
    on_progress: Callable[[ProgressEvent], None] | None = None,
    cancel: threading.Event | None = None,
    disk_free: Callable[[Path], int] = free_bytes,
) -> DownloadResult:
    """Fetch `snapshot` into `dest_dir`, verify every file, then write the manifest. Blocking.

    Idempotent: a complete directory costs no request; a partial one resumes (Range requests)
    and reuses verified files. A file failing verification is deleted and fetched once more.
    `on_progress` runs on this thread at most every PROGRESS_INTERVAL_S, plus a final event.
    Setting `cancel` raises DownloadCancelled within one received chunk. Not safe to run twice
    concurrently on one `dest_dir`. Raises a DownloadError subclass, or OSError for local I/O.
    """
    dest, started = Path(dest_dir), time.monotonic()
    progress = _Progress(snapshot, on_progress, cancel)
    if is_complete(dest, snapshot):
        progress.finish()
        return DownloadResult(snapshot, dest, (), 0, time.monotonic() - started)
    where: dict[str, Any] = {
        "repo_id": snapshot.repo_id, "revision": snapshot.revision, "commit": snapshot.commit,
    }  # fmt: skip
    if check_disk(snapshot, dest, disk_free=disk_free) and constants.is_offline_mode():
        raise OfflineError("HF_HUB_OFFLINE is set and files are missing", **where)

    dest.mkdir(parents=True, exist_ok=True)
    (dest / PARTIAL_DIR).mkdir(exist_ok=True)
    trusted = forget_other_snapshots(dest, snapshot)
    journal = {path: f for path, f in trusted.items() if size_of(dest / path) == f.size}
    headers = build_hf_headers(token=token, library_name="lmx")
    fetched: list[str] = []
    for f in snapshot.files:
        progress.begin_file(f.path)
        final = dest / f.path
        if journal.get(f.path) == f or (size_of(final) == f.size and _verified(final, f)):
            progress.add(f.size)
        else:
            final.unlink(missing_ok=True)
            with translated(snapshot.repo_id, snapshot.revision, snapshot.commit, f.path):
                if _fetch(f, snapshot, dest, headers, progress):
                    fetched.append(f.path)
            partial_path(dest, f).replace(final)
        journal[f.path] = f
        write_journal(dest, journal)

    write_manifest(dest, snapshot)
    shutil.rmtree(dest / PARTIAL_DIR, ignore_errors=True)
    progress.finish()
    return DownloadResult(
        snapshot, dest, tuple(fetched), progress.fetched, time.monotonic() - started
    )


def fetch_file(
    snapshot: RepoSnapshot, path: str, dest_dir: Path | str, *, token: str | None = None
) -> Path:
    """Fetch one file of `snapshot` ahead of `download` (to read it before deciding whether to
    download the rest) and return where its verified bytes are: the file itself if `dest_dir`
    already holds it verified, else a verified partial file that `download` moves into place
    without a request. Files of a completed download are never touched. Blocking. Raises
    ValueError if `path` is not in the snapshot, a DownloadError subclass, or OSError.
    """
    dest = Path(dest_dir)
    f = next((x for x in snapshot.files if x.path == path), None)
    if f is None:
        raise ValueError(f"{path} is not a file of {snapshot.repo_id}@{snapshot.commit}")
    final = dest / f.path
    if is_complete(dest, snapshot) or (
        read_journal(dest).get(f.path) == f and size_of(final) == f.size
    ):
        return final
    where: dict[str, Any] = {
        "repo_id": snapshot.repo_id, "revision": snapshot.revision, "commit": snapshot.commit,
    }  # fmt: skip
    if constants.is_offline_mode() and size_of(partial_path(dest, f)) != f.size:
        raise OfflineError("HF_HUB_OFFLINE is set and the file is missing", file=f.path, **where)
    (dest / PARTIAL_DIR).mkdir(parents=True, exist_ok=True)
    headers = build_hf_headers(token=token, library_name="lmx")
    with translated(snapshot.repo_id, snapshot.revision, snapshot.commit, f.path):
        _fetch(f, snapshot, dest, headers, _Progress(snapshot, None, None))
    return partial_path(dest, f)


# ------------------------------------------------------------------------------------- internals


class _Progress:
    """Aggregates byte counts from huggingface_hub's progress bars into throttled events."""

    def __init__(
        self, snapshot: RepoSnapshot, sink: Callable[[ProgressEvent], None] | None,
        cancel: threading.Event | None,
    ) -> None:  # fmt: skip
        self.snapshot, self.sink, self.cancel = snapshot, sink, cancel
        self.done = self.fetched = 0
        self.file = snapshot.files[0].path if snapshot.files else ""
        self.started = time.monotonic()
        self.last_emit: float | None = None

    def begin_file(self, path: str) -> None:
        self.check_cancel()
        self.file = path

    def add(self, n: int, *, transferred: bool = False) -> None:
        self.done += n
        if transferred:
            self.fetched += n
        self.check_cancel()
        now = time.monotonic()
        if self.last_emit is None or now - self.last_emit >= PROGRESS_INTERVAL_S:
            self._emit(now)

    def finish(self) -> None:
        self.done = self.snapshot.total_bytes
        self._emit(time.monotonic())

    def check_cancel(self) -> None:
        if self.cancel is not None and self.cancel.is_set():
            raise DownloadCancelled(
                "cancelled", repo_id=self.snapshot.repo_id, revision=self.snapshot.revision,
                commit=self.snapshot.commit, file=self.file,
            )  # fmt: skip

    def bar_class(self) -> type[hf_tqdm]:
        """A tqdm class for http_get whose updates feed this tracker and draw nothing."""
        progress = self

        class _Bar(hf_tqdm):
            def __init__(self, *args: Any, **kwargs: Any) -> None:
                kwargs["disable"] = True  # lmx reports progress itself; never draw on a terminal
                super().__init__(*args, **kwargs)  # type: ignore[no-untyped-call]

            def update(self, n: float | None = 1) -> bool | None:
                progress.add(int(n or 0), transferred=True)  # may raise DownloadCancelled
                return None

        return _Bar

    def _emit(self, now: float) -> None:
        self.last_emit = now
        if self.sink is None:
            return
        total = self.snapshot.total_bytes
        elapsed = max(now - self.started, 1e-6)
        rate = self.fetched / elapsed
        eta = 0.0 if self.done >= total else ((total - self.done) / rate if rate > 0 else None)
        self.sink(ProgressEvent(self.snapshot.repo_id, self.file, self.done, total, rate, eta))


def _fetch(
    f: RemoteFile, snapshot: RepoSnapshot, dest: Path, headers: dict[str, str], progress: _Progress
) -> bool:
    """Complete and verify `f`'s partial file (resuming it), leaving it at `partial_path`.
    Returns whether bytes were transferred (a partial already complete needs none)."""
    partial = partial_path(dest, f)
    url = hf_hub_url(snapshot.repo_id, f.path, revision=snapshot.commit)
    transferred = False
    for attempt in (1, 2):
        have = size_of(partial) or 0
        if have > f.size:
            partial.unlink()
            have = 0
        progress.add(have)
        if have < f.size:
            # No expected_size: lmx verifies size and hash itself, and hf's 50 GB guard would
            # refuse a plain-HTTP fetch that lmx can resume.
            transferred = True
            # huggingface_hub reads a response in chunks of this many bytes (10 MiB), counting
            # each once whole, then writing it: a cancel (a stop, want: absent) waited for a
            # chunk to come (20 s at 512 KiB/s), and the chunk it came with was never written.
            constants.DOWNLOAD_CHUNK_SIZE = min(constants.DOWNLOAD_CHUNK_SIZE, CHUNK_BYTES)
            with partial.open("ab") as out:
                http_get(url, out, resume_size=have, headers=headers,
                         displayed_filename=f.path, tqdm_class=progress.bar_class())  # fmt: skip
                out.flush()
                os.fsync(out.fileno())
            log.info("download_file_fetched", repo=snapshot.repo_id, file=f.path, resumed_from=have)
        if _verified(partial, f):
            return transferred
        progress.add(-(size_of(partial) or 0))
        partial.unlink()
        log.warning("download_file_corrupt", repo=snapshot.repo_id, file=f.path, attempt=attempt)
    raise VerificationError(
        "size or hash mismatch after a second fetch", repo_id=snapshot.repo_id,
        revision=snapshot.revision, commit=snapshot.commit, file=f.path,
    )  # fmt: skip


def _verified(path: Path, f: RemoteFile) -> bool:
    """Size, then sha256 (LFS) or the git blob sha1 (small files); size only if the Hub gave
    neither. Reads the whole file."""
    if size_of(path) != f.size:
        return False
    if f.sha256 is not None:
        digest = hashlib.sha256()
    elif f.git_oid is not None:
        digest = hashlib.sha1(f"blob {f.size}\0".encode())  # git's object header
    else:
        return True
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest() == (f.sha256 or f.git_oid)
