"""Durable file replacement: the one way lmx writes a file that a crash must not leave half done.

Used for the user's config.yaml, the service file, download manifests and lmx's own state (the
journal, measured footprints). Temp file in the same directory, fsync, rename, fsync the directory;
`remove_stale_temps` removes the temp files a crash left.
"""

from __future__ import annotations

import contextlib
import glob
import os
import tempfile
from pathlib import Path

_TMP_SUFFIX = ".tmp"


class FileChanged(Exception):
    """The file no longer held what `write_atomic` was told to expect: it was left as it is."""


def write_atomic(
    path: Path, text: str, *, mode: int | None = None, expect: str | None = None
) -> None:
    """Replace `path` with `text`; a crash leaves the old file or the new one, whole.

    The file keeps its current permissions unless `mode` is given (new files: 0644). Creates the
    parent directory. On failure the temporary file is removed and the old file is untouched.
    `expect`: the text the file must still hold right before it is replaced (another writer, a
    person's editor, may have saved since it was read), else FileChanged.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    if mode is None:
        mode = path.stat().st_mode & 0o777 if path.exists() else 0o644
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=_TMP_SUFFIX)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        if expect is not None and _text_or_none(path) != expect:
            raise FileChanged(str(path))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def remove_stale_temps(path: Path, *, before_s: float) -> list[Path]:
    """Remove the temp files of `write_atomic(path, ...)` calls that a crash cut short: those last
    modified before `before_s` (a `time.time()`), as a write under way may be newer. Returns the
    files removed. Never raises."""
    removed = []
    for tmp in path.parent.glob(f".{glob.escape(path.name)}.*{_TMP_SUFFIX}"):
        with contextlib.suppress(OSError):
            if tmp.stat().st_mtime < before_s:
                tmp.unlink()
                removed.append(tmp)
    return removed


def fsync_dir(path: Path) -> None:
    """Make renames in `path` durable. Platforms that cannot open a directory only lose that."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _text_or_none(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None
