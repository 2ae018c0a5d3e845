"""What lmx records about a Hub download on disk, and what it owns there: the pinned snapshot
(`RepoSnapshot`), the completion manifest, the journal of files verified by an unfinished
download, partial files, and `prune`, which deletes exactly those.

Used by `downloads.py` (which fetches) and the model store (which asks whether a model is
complete). Local file I/O only: no HTTP, no hashing of file contents. Everything here blocks.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from dataclasses import dataclass
from datetime import UTC, datetime
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any, Final

from lmx.runtime.files import fsync_dir, write_atomic

MANIFEST_NAME: Final = ".lmx-download.json"
PARTIAL_DIR: Final = ".lmx-partial"  # partial files and the verified-file journal live here
_JOURNAL_NAME: Final = "verified.json"
_HF_LOCAL_DIR_CACHE: Final = Path(".cache") / "huggingface"  # hf's local_dir metadata, if any
_MANIFEST_FORMAT: Final = 1
# What mlx_lm.load reads from a repo's root; other weight formats (*.bin, *.pt, *.gguf, *.h5,
# *.onnx, *.msgpack, consolidated.*) would only cost disk.
_WANTED: Final = ("*.safetensors", "*.json", "tokenizer.model", "tiktoken.model", "*.tiktoken")
_WANTED_TEXT: Final = ("*.jinja", "*.txt")


@dataclass(frozen=True)
class RemoteFile:
    path: str
    size: int
    sha256: str | None = None  # LFS files: sha256 of the content
    git_oid: str | None = None  # other files: git blob sha1 (what the Hub sends as ETag)


@dataclass(frozen=True)
class RepoSnapshot:
    """A revision pinned to a commit, and the files MLX needs from it."""

    repo_id: str
    revision: str
    commit: str
    files: tuple[RemoteFile, ...]

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)


def wanted_file(path: str) -> bool:
    """Whether MLX needs this repo file: root-level weights, configs and tokenizer files only."""
    if "/" in path or "\\" in path or path.startswith(".") or path.startswith("consolidated"):
        return False
    return any(fnmatchcase(path, p) for p in (*_WANTED, *_WANTED_TEXT))


# ------------------------------------------------------------------------------------ manifest


def read_manifest(dest_dir: Path | str) -> RepoSnapshot | None:
    """The snapshot recorded by the last completed download into `dest_dir`, or None."""
    try:
        data = json.loads((Path(dest_dir) / MANIFEST_NAME).read_text(encoding="utf-8"))
        if data.get("format") != _MANIFEST_FORMAT:
            return None
        files = tuple(_file_from_json(f) for f in data["files"])
        return RepoSnapshot(str(data["repo_id"]), str(data["revision"]), str(data["commit"]), files)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def write_manifest(dest: Path, snapshot: RepoSnapshot) -> None:
    """Mark `dest` complete for `snapshot` (atomically). Call only once every file is verified."""
    fsync_dir(dest)
    write_json_atomic(dest / MANIFEST_NAME, _manifest_json(snapshot))


def is_complete(dest_dir: Path | str, snapshot: RepoSnapshot | None = None) -> bool:
    """Whether `dest_dir` holds a completed download (of `snapshot`, if given). Cheap: it reads the
    manifest and stats each file's size, hashing nothing. Never raises."""
    manifest = read_manifest(dest_dir)
    if manifest is None:
        return False
    if snapshot is not None and (manifest.repo_id, manifest.commit, manifest.files) != (
        snapshot.repo_id, snapshot.commit, snapshot.files,
    ):  # fmt: skip
        return False
    return all(size_of(Path(dest_dir) / f.path) == f.size for f in manifest.files)


# ----------------------------------------------------------------------- journal and partials


def read_journal(dest: Path) -> dict[str, RemoteFile]:
    """Files an unfinished download has verified and moved into place, by path."""
    try:
        entries = json.loads((dest / PARTIAL_DIR / _JOURNAL_NAME).read_text(encoding="utf-8"))
        return {f.path: f for f in (_file_from_json(e) for e in entries)}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}


def write_journal(dest: Path, verified: dict[str, RemoteFile]) -> None:
    write_json_atomic(
        dest / PARTIAL_DIR / _JOURNAL_NAME, [_file_to_json(f) for f in verified.values()]
    )


def partial_path(dest: Path, f: RemoteFile) -> Path:
    # Keyed by content hash so a partial from another commit is never resumed into this one.
    key = (f.sha256 or f.git_oid or f"size{f.size}")[:16]
    return dest / PARTIAL_DIR / f"{f.path}.{key}.incomplete"


def forget_other_snapshots(dest: Path, snapshot: RepoSnapshot) -> dict[str, RemoteFile]:
    """Invalidate the manifest, delete lmx's files and partials that `snapshot` does not use,
    and return the files already verified (by path) that it does use."""
    known: dict[str, RemoteFile] = {}
    old = read_manifest(dest)
    for f in (*(old.files if old else ()), *read_journal(dest).values()):
        known[f.path] = f
    write_journal(dest, known)  # before the manifest goes: a crash leaves every file listed
    (dest / MANIFEST_NAME).unlink(missing_ok=True)
    wanted = {f.path: f for f in snapshot.files}
    for path in known:
        if path not in wanted:
            (dest / path).unlink(missing_ok=True)
    keep = {partial_path(dest, f).name for f in snapshot.files}
    for stale in (dest / PARTIAL_DIR).glob("*.incomplete"):
        if stale.name not in keep:
            stale.unlink()
    return {path: f for path, f in known.items() if wanted.get(path) == f}


def prune(dest_dir: Path | str) -> int:
    """Delete what lmx downloaded into `dest_dir`: files its manifest or journal lists, partial
    files, huggingface_hub's local-dir metadata and the manifest; then the directory if empty.
    Other files are never touched. Returns the bytes freed. Idempotent: a prune cut short (a
    crash) is finished by the next, the manifest naming what is left."""
    dest, freed = Path(dest_dir), 0
    manifest = read_manifest(dest)
    ours = {f.path for f in manifest.files} if manifest else set()
    ours |= set(read_journal(dest))  # files verified by an interrupted download
    for path in sorted(ours):
        target = dest / path
        if target.is_file():
            freed += target.stat().st_size
            target.unlink()
    for tree in (dest / PARTIAL_DIR, dest / _HF_LOCAL_DIR_CACHE):
        if tree.is_dir():
            freed += sum(p.stat().st_size for p in tree.rglob("*") if p.is_file())
            shutil.rmtree(tree)
    (dest / MANIFEST_NAME).unlink(missing_ok=True)  # last: it names what the next prune deletes
    for empty in (dest / ".cache", dest):
        with contextlib.suppress(OSError):  # not empty, or already gone
            empty.rmdir()
    return freed


# ------------------------------------------------------------------------------------ plumbing


def size_of(path: Path) -> int | None:
    try:
        return path.stat().st_size if path.is_file() else None
    except OSError:
        return None


def write_json_atomic(path: Path, data: object) -> None:
    write_atomic(path, json.dumps(data, indent=1))


def _file_to_json(f: RemoteFile) -> dict[str, Any]:
    return {"path": f.path, "size": f.size, "sha256": f.sha256, "git_oid": f.git_oid}


def _file_from_json(d: dict[str, Any]) -> RemoteFile:
    path, size = d["path"], d["size"]
    if not isinstance(path, str) or not wanted_file(path) or not isinstance(size, int):
        raise ValueError(f"bad file entry {d!r}")
    return RemoteFile(path, size, d.get("sha256"), d.get("git_oid"))


def _manifest_json(snapshot: RepoSnapshot) -> dict[str, Any]:
    return {
        "format": _MANIFEST_FORMAT,
        "repo_id": snapshot.repo_id,
        "revision": snapshot.revision,
        "commit": snapshot.commit,
        "total_bytes": snapshot.total_bytes,
        "completed_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "files": [_file_to_json(f) for f in snapshot.files],
    }
