"""Hub downloads: pin a repo revision to a commit and file list, fetch those files into a directory
lmx owns (resuming partial files, verifying every byte), and mark completion with a manifest.

Called by the model store on a worker thread: every function here blocks. All HTTP goes through
huggingface_hub's client. It never imports mlx and never decides whether to download. What lmx
records on disk (manifest, journal, partial files) and `prune` live in `download_manifest.py`.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Final

import httpx2
import structlog
from huggingface_hub import HfApi, constants, hf_hub_url
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    OfflineModeIsEnabled,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.file_download import http_get

# Public API (documented), but exported through a dynamic __all__ that mypy cannot read.
from huggingface_hub.utils import build_hf_headers  # type: ignore[attr-defined]
from huggingface_hub.utils.tqdm import tqdm as hf_tqdm

from lmx.errors import LmxError, PermanentError, TemporaryError

# Re-exported: callers of downloads need these names and should not care where they are kept.
from lmx.runtime.download_manifest import MANIFEST_NAME as MANIFEST_NAME
from lmx.runtime.download_manifest import PARTIAL_DIR as PARTIAL_DIR
from lmx.runtime.download_manifest import RemoteFile as RemoteFile
from lmx.runtime.download_manifest import RepoSnapshot as RepoSnapshot
from lmx.runtime.download_manifest import (
    forget_other_snapshots,
    partial_path,
    read_journal,
    size_of,
    write_journal,
    write_manifest,
)
from lmx.runtime.download_manifest import is_complete as is_complete
from lmx.runtime.download_manifest import prune as prune
from lmx.runtime.download_manifest import read_manifest as read_manifest
from lmx.runtime.download_manifest import wanted_file as wanted_file

log = structlog.get_logger(__name__)

DISK_MARGIN_BYTES: Final = 1 << 30
PROGRESS_INTERVAL_S = 0.25  # at most ~4 progress events a second (tests lower it)


# ---------------------------------------------------------------------------------------- errors


class DownloadError(LmxError):
    """Base of every download failure; the message names repo, revision, commit and file.

    DownloadError (LmxError)
    ├── TransientDownloadError (Temporary)  5xx, 429, timeouts, dropped connections
    ├── OfflineError (Temporary)            HF_HUB_OFFLINE=1, or the Hub cannot be reached
    ├── InsufficientDisk (Temporary)        too little free space for what is left to fetch
    ├── RepoNotFound, RevisionNotFound, GatedRepo, AccessDenied, UnsupportedRepo (Permanent)
    ├── VerificationError (Permanent)       a file failed its size/hash check twice
    └── DownloadCancelled                   the caller's cancel event was set
    """

    def __init__(
        self, message: str, *, repo_id: str, revision: str, commit: str | None = None,
        file: str | None = None,
    ) -> None:  # fmt: skip
        self.repo_id, self.revision, self.commit, self.file = repo_id, revision, commit, file
        where = f"{repo_id}@{revision}" + (f" (commit {commit[:12]})" if commit else "")
        super().__init__(f"{where}{f' {file}' if file else ''}: {message}")


class _RetryLater(DownloadError, TemporaryError):
    default_delay_s: ClassVar[float] = 5.0

    def __init__(
        self, message: str, *, repo_id: str, revision: str, commit: str | None = None,
        file: str | None = None, delay_s: float | None = None,
    ) -> None:  # fmt: skip
        super().__init__(message, repo_id=repo_id, revision=revision, commit=commit, file=file)
        self.delay_s = self.default_delay_s if delay_s is None else delay_s


class TransientDownloadError(_RetryLater):
    """Retry with backoff: 5xx, 429, timeouts, dropped connections. A partial file is kept."""


class OfflineError(_RetryLater):
    """HF_HUB_OFFLINE is set or the Hub is unreachable; the reconciler reports reason `Offline`."""

    default_delay_s = 30.0


class InsufficientDisk(_RetryLater):
    """Free space is below what is left to fetch plus a margin; nothing was fetched."""

    default_delay_s = 60.0


class RepoNotFound(DownloadError, PermanentError):
    """No such repo, or it is private and the token does not grant access."""


class RevisionNotFound(DownloadError, PermanentError):
    """The repo exists but the revision (or a file at the pinned commit) does not."""


class GatedRepo(DownloadError, PermanentError):
    """The repo is gated and the token has not been granted access."""


class AccessDenied(DownloadError, PermanentError):
    """The Hub refused the token (invalid, or lacking permission)."""


class UnsupportedRepo(DownloadError, PermanentError):
    """The revision has no *.safetensors weights, so MLX could not load it."""


class VerificationError(DownloadError, PermanentError):
    """A file failed its size or hash check, was fetched again, and failed again."""


class DownloadCancelled(DownloadError):
    """The caller's cancel event was set; partial files are kept for a later resume."""


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

    One Hub request, no retry (the reconciler backs off). `token=None` lets huggingface_hub use
    HF_TOKEN, then the stored login. Raises a DownloadError subclass.
    """
    with _translated(repo_id, revision):
        info = HfApi(library_name="lmx").model_info(
            repo_id, revision=revision, files_metadata=True, token=token
        )
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
        if _size_of(dest / f.path) == f.size:
            continue
        partial = _size_of(_partial_path(dest, f)) or 0
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
    trusted = _forget_other_snapshots(dest, snapshot)
    journal = {path: f for path, f in trusted.items() if _size_of(dest / path) == f.size}
    headers = build_hf_headers(token=token, library_name="lmx")
    fetched: list[str] = []
    for f in snapshot.files:
        progress.begin_file(f.path)
        final = dest / f.path
        if journal.get(f.path) == f or (_size_of(final) == f.size and _verified(final, f)):
            progress.add(f.size)
        else:
            final.unlink(missing_ok=True)
            fetched.append(f.path)
            with _translated(snapshot.repo_id, snapshot.revision, snapshot.commit, f.path):
                _fetch(f, snapshot, dest, headers, progress)
        journal[f.path] = f
        _write_json_atomic(
            dest / PARTIAL_DIR / _JOURNAL_NAME, [_file_to_json(x) for x in journal.values()]
        )

    _fsync_dir(dest)
    _write_json_atomic(dest / MANIFEST_NAME, _manifest_json(snapshot))
    shutil.rmtree(dest / PARTIAL_DIR, ignore_errors=True)
    progress.finish()
    return DownloadResult(
        snapshot, dest, tuple(fetched), progress.fetched, time.monotonic() - started
    )


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
) -> None:
    """Download one file through its partial file, verify it, and move it into place."""
    partial = _partial_path(dest, f)
    url = hf_hub_url(snapshot.repo_id, f.path, revision=snapshot.commit)
    for attempt in (1, 2):
        have = _size_of(partial) or 0
        if have > f.size:
            partial.unlink()
            have = 0
        progress.add(have)
        if have < f.size:
            # No expected_size: lmx verifies size and hash itself, and hf's 50 GB guard would
            # refuse a plain-HTTP fetch that lmx can resume.
            with partial.open("ab") as out:
                http_get(url, out, resume_size=have, headers=headers,
                         displayed_filename=f.path, tqdm_class=progress.bar_class())  # fmt: skip
                out.flush()
                os.fsync(out.fileno())
            log.info("download_file_fetched", repo=snapshot.repo_id, file=f.path, resumed_from=have)
        if _verified(partial, f):
            partial.replace(dest / f.path)
            return
        progress.add(-(_size_of(partial) or 0))
        partial.unlink()
        log.warning("download_file_corrupt", repo=snapshot.repo_id, file=f.path, attempt=attempt)
    raise VerificationError(
        "size or hash mismatch after a second fetch", repo_id=snapshot.repo_id,
        revision=snapshot.revision, commit=snapshot.commit, file=f.path,
    )  # fmt: skip


def _verified(path: Path, f: RemoteFile) -> bool:
    """Size, then sha256 (LFS) or the git blob sha1 (small files); size only if the Hub gave
    neither. Reads the whole file."""
    if _size_of(path) != f.size:
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


@contextlib.contextmanager
def _translated(
    repo_id: str, revision: str, commit: str | None = None, file: str | None = None
) -> Iterator[None]:
    """Turn huggingface_hub, httpx2 and disk-full errors into DownloadError subclasses."""
    where: dict[str, Any] = dict(repo_id=repo_id, revision=revision, commit=commit, file=file)
    try:
        yield
    except DownloadError:
        raise
    except OfflineModeIsEnabled as e:
        raise OfflineError("HF_HUB_OFFLINE is set", **where) from e
    except GatedRepoError as e:  # before RepositoryNotFoundError: it is a subclass
        raise GatedRepo("gated repo: request access on the Hub, then set a token", **where) from e
    except RepositoryNotFoundError as e:
        raise RepoNotFound(
            "repo not found (or private and the token has no access)", **where
        ) from e
    except RevisionNotFoundError as e:
        raise RevisionNotFound("revision not found", **where) from e
    except RemoteEntryNotFoundError as e:
        raise RevisionNotFound("file not found at this commit", **where) from e
    except HfHubHTTPError as e:
        status = e.response.status_code
        if status in (401, 403):
            raise AccessDenied(f"HTTP {status}: the token was refused", **where) from e
        retry_after = e.response.headers.get("Retry-After", "")
        delay = float(retry_after) if retry_after.isdigit() else 5.0
        raise TransientDownloadError(f"HTTP {status} from the Hub", delay_s=delay, **where) from e
    except (httpx2.ConnectError, httpx2.ConnectTimeout, httpx2.ProxyError) as e:
        raise OfflineError(f"cannot reach the Hub: {e}", **where) from e
    except httpx2.TransportError as e:  # read timeouts, dropped connections, protocol errors
        raise TransientDownloadError(f"{type(e).__name__}: {e}", **where) from e
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise InsufficientDisk("disk full while writing", **where) from e
        if e.errno is None:  # huggingface_hub's "Consistency check failed" (size mismatch)
            raise TransientDownloadError((str(e) or repr(e)).splitlines()[0], **where) from e
        raise
