"""The download error tree, and the translation of huggingface_hub, httpx2 and disk errors into it.

Raised by `downloads.py` (re-exported there); the reconciler turns them into outcomes: Temporary
ones back off, Permanent ones wait for a spec change. No I/O here.
"""

from __future__ import annotations

import contextlib
import errno
from collections.abc import Iterator
from typing import Any, ClassVar

import httpx2
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    OfflineModeIsEnabled,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from lmx.errors import LmxError, PermanentError, TemporaryError


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


@contextlib.contextmanager
def translated(
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
