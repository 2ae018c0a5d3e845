"""Changing the desired state through the API: merge patches and replacements of config.yaml.

The one writer of the config file (the person's editor aside). Every change is validated as a
whole, checked against the budget, written atomically with the user's comments kept, then handed
to the reconciler. Serialized by a lock; a concurrent editor's save is detected and merged over.
A symlinked config file is written through: its target is replaced, the link kept. A missing
file is not patched (the patch would be all it held): only a whole document may create it.
"""

from __future__ import annotations

import asyncio
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmx.errors import ConfigError, LmxError
from lmx.reconciler import manifest
from lmx.reconciler.actions import Plan
from lmx.reconciler.loop import Reconciler
from lmx.reconciler.spec import DesiredState
from lmx.reconciler.writeback import (
    dump_tree,
    etag_of,
    load_checked_tree,
    load_tree,
    merge_patch,
)
from lmx.runtime.files import FileChanged, write_atomic

_CAS_ATTEMPTS = 3
_CHANGED = "the changed desired state"
_BODY = "request body"


class PreconditionFailed(LmxError):
    """If-Match named an ETag that is no longer current (HTTP 412)."""

    def __init__(self, expected: str, current: str) -> None:
        self.current = current
        super().__init__(f"the desired state changed: If-Match {expected} but it is now {current}")


class EditConflict(LmxError):
    """The config file is in no state to take the change (HTTP 409); the message says why."""


class WriteFailed(LmxError):
    """The config file could not be written (HTTP 500): the message names it and the OS error."""


@dataclass(frozen=True)
class Current:
    etag: str
    data: dict[str, Any]


@dataclass(frozen=True)
class EditResult:
    desired: DesiredState
    data: dict[str, Any]
    etag: str
    plan: Plan | None
    written: bool


class DesiredEditor:
    def __init__(self, config_path: Path, reconciler: Reconciler) -> None:
        self.path = config_path
        self._reconciler = reconciler
        self._lock = asyncio.Lock()
        # ETags are keyed by a secret of this process's (see etag_of): an If-Match taken from
        # the daemon before a restart is answered 412, and the client reads again.
        self._etag_key = secrets.token_bytes(32)

    def read(self) -> Current:
        """The file as it is now: its data as the daemon reads it, even if it is invalid ({} if
        it is missing, or not YAML)."""
        text = self._text() or ""
        try:
            manifest.check_text(text, source=str(self.path))
            data = manifest.shown(text)
        except ConfigError:
            data = {}
        return Current(self._etag(text), data)

    async def patch(
        self, patch: dict[str, Any], *, if_match: str | None, dry_run: bool
    ) -> EditResult:
        """Apply an RFC 7396 merge patch. Raises PreconditionFailed, ConfigError (422),
        EditConflict (the file is missing, or kept changing), WriteFailed."""
        if not isinstance(patch, dict):
            raise ConfigError(
                "PATCH /admin/desired", ["(root): a merge patch must be a JSON object"]
            )

        def edit(text: str | None) -> str:
            if text is None:
                raise EditConflict(self._missing())
            tree = load_tree(text, str(self.path))
            merge_patch(tree, patch)
            return dump_tree(tree)

        return await self._change(edit, _CHANGED, if_match=if_match, dry_run=dry_run)

    async def replace(self, text: str, *, if_match: str | None, dry_run: bool) -> EditResult:
        """Replace the whole file with `text` (YAML, comments and all). Raises
        PreconditionFailed, ConfigError (422), EditConflict (the file kept changing),
        WriteFailed. Creates the file if it is missing."""
        return await self._change(lambda _old: text, _BODY, if_match=if_match, dry_run=dry_run)

    def _text(self) -> str | None:
        """The file's text; None if it is missing (or is a link to nothing)."""
        try:
            return self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None

    def _missing(self) -> str:
        link = f" (a link to {self.path.resolve()})" if self.path.is_symlink() else ""
        return (
            f"{self.path} is missing{link}: restore it, or replace the whole desired state"
            " (PUT /admin/desired, `lmx apply -f FILE`); nothing was changed"
        )

    def _etag(self, text: str) -> str:
        return etag_of(text, self._etag_key)

    async def _change(
        self, edit: Any, source: str, *, if_match: str | None, dry_run: bool
    ) -> EditResult:
        """Apply `edit` (old text -> new text) under the lock. Each text is checked for
        duplicate keys once: the file's by a patch's `load_tree`, the new one by `parse`."""
        async with self._lock:
            for _ in range(_CAS_ATTEMPTS):
                text = self._text()
                etag = self._etag(text or "")
                if if_match is not None and if_match not in (etag, "*"):
                    raise PreconditionFailed(if_match, etag)
                new_text = edit(text)
                # Validated as the daemon will read the file back: PyYAML, empty and duplicate
                # keys refused, the lines of the text as it would be written.
                desired = manifest.parse(new_text, source=source)
                load_checked_tree(new_text, source)  # refused now if the next edit could not
                data = manifest.shown(new_text)
                try:
                    await self._reconciler.check(desired)
                except ConfigError as exc:
                    raise ConfigError(exc.source, manifest.locate(exc.errors, new_text)) from None
                if dry_run:
                    plan = await self._reconciler.dry_run(desired)
                    return EditResult(desired, data, etag, plan, written=False)
                # Compare and swap: an editor's save since we read is merged over, not lost. It
                # is checked again right before the rename (after the new text's fsync).
                if self._text() != text:
                    continue
                # Through a symlink (a dotfiles setup), the link's target is replaced, in its
                # own directory; the link stays a link.
                try:
                    await asyncio.to_thread(
                        write_atomic, self.path.resolve(), new_text, expect=text
                    )
                except FileChanged:
                    continue
                except OSError as exc:  # a full disk, a read-only one: left as it was
                    raise WriteFailed(f"cannot write {self.path}: {exc.strerror or exc}") from None
                await self._reconciler.apply_desired(desired)
                return EditResult(desired, data, self._etag(new_text), None, written=True)
        raise EditConflict(
            f"{self.path} changed while it was being written, {_CAS_ATTEMPTS} times: nothing was"
            " changed; retry"
        )
