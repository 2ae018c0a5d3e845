"""The intent journal: each side effect is recorded before it starts and cleared when it ends.

A small JSON file under LMX_HOME, replaced atomically on every write. The executor records;
at start the reconciler reads what a previous process left unfinished: downloads to resume, and
loads that never finished (the process died during them). Two such deaths of the same model and
load config quarantine it. Deletes cut short are logged (the store finishes them). It also keeps
the models quarantined (the reconciler's record), so that a restart does not load them again.
Blocking file I/O: calls take milliseconds and run on the loop thread.

A write that fails (a full disk) refuses the side effect about to begin (JournalUnwritable, a
TemporaryError: it is retried, backing off); one that records an end or a quarantine is logged and
carried by the next write that succeeds.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Any

import structlog

from lmx.errors import TemporaryError
from lmx.runtime.files import write_atomic

log = structlog.get_logger(__name__)

CRASHES_TO_QUARANTINE = 2
_FORMAT = 1


class JournalUnwritable(TemporaryError):
    """The journal could not be written, so the side effect it was to record did not begin."""


class Intent(StrEnum):
    DOWNLOAD = "download"
    LOAD = "load"
    UNLOAD = "unload"
    DELETE = "delete"


@dataclass(frozen=True)
class Quarantine:
    """A model taken out of service, as kept across restarts."""

    spec_digest: str  # ModelSpec.digest() of the spec it failed under
    reason: str
    message: str


_QUARANTINE_FIELDS = tuple(f.name for f in dataclasses.fields(Quarantine))


@dataclass(frozen=True)
class Recovery:
    """What the previous process left: downloads to resume, load crash counts per model, and the
    models it had quarantined."""

    downloads: frozenset[str]
    crashed_loads: dict[str, tuple[str, int]]  # model id -> (load digest, deaths in a row)
    quarantined: dict[str, Quarantine]

    def crash_quarantined(self, model_id: str, digest: str) -> int:
        """How many times this model's load killed the process, if enough to quarantine it."""
        entry = self.crashed_loads.get(model_id)
        if entry and entry[0] == digest and entry[1] >= CRASHES_TO_QUARANTINE:
            return entry[1]
        return 0


class Journal:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._pending: dict[str, dict[str, Any]] = {}  # "<intent>:<model>" -> entry
        self._crashes: dict[str, dict[str, Any]] = {}  # model -> {"digest", "count"}
        self._quarantined: dict[str, dict[str, str]] = {}  # model -> Quarantine's fields

    def recover(self) -> Recovery:
        """Read what a previous process left unfinished, count load deaths, and start clean.
        Quarantines are kept as they were until the reconciler sets them (`set_quarantined`)."""
        data = self._read()
        pending = data.get("pending", {})
        self._crashes = {
            k: v
            for k, v in data.get("crashes", {}).items()
            if isinstance(v, dict) and isinstance(v.get("count"), int)
        }
        quarantined = {
            k: Quarantine(*(v[f] for f in _QUARANTINE_FIELDS))
            for k, v in data.get("quarantined", {}).items()
            if isinstance(v, dict) and all(isinstance(v.get(f), str) for f in _QUARANTINE_FIELDS)
        }
        self._quarantined = {k: dataclasses.asdict(q) for k, q in quarantined.items()}
        downloads = set()
        for entry in pending.values():
            kind, model, digest = entry.get("intent"), entry.get("model"), entry.get("digest")
            if not isinstance(model, str):
                continue
            if kind == Intent.DOWNLOAD:
                downloads.add(model)
                self._pending[f"{kind}:{model}"] = entry
            elif kind == Intent.LOAD:
                prev = self._crashes.get(model, {})
                count = prev.get("count", 0) + 1 if prev.get("digest") == digest else 1
                self._crashes[model] = {"digest": digest, "count": count}
                log.warning("load_interrupted_by_exit", model=model, deaths=count)
            elif kind == Intent.DELETE:
                # Nothing to redo: the store finishes a delete it began (`finish_deletes`), and
                # one not begun left the model whole, deleted again if its spec still says so.
                log.warning("delete_interrupted_by_exit", model=model)
        self._write_or_log()
        crashed = {m: (str(v.get("digest")), int(v["count"])) for m, v in self._crashes.items()}
        return Recovery(frozenset(downloads), crashed, quarantined)

    def begin(self, intent: Intent, model_id: str, digest: str) -> None:
        """Record a side effect about to begin. Raises JournalUnwritable if it cannot be."""
        key = f"{intent}:{model_id}"
        self._pending[key] = {
            "intent": str(intent),
            "model": model_id,
            "digest": digest,
            "since": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        try:
            self._write()
        except JournalUnwritable:
            del self._pending[key]
            raise

    def end(self, intent: Intent, model_id: str, *, ok: bool) -> None:
        """The side effect finished (or failed without taking the process down)."""
        self._pending.pop(f"{intent}:{model_id}", None)
        if intent is Intent.LOAD and ok:
            self._crashes.pop(model_id, None)
        self._write_or_log()

    def set_quarantined(self, models: dict[str, Quarantine]) -> None:
        """Record the models quarantined now, all of them: one left out is lifted, and the count
        of its loads that ended the process starts over. Writes only what changed."""
        entries = {mid: dataclasses.asdict(q) for mid, q in models.items()}
        if entries != self._quarantined:
            for lifted in self._quarantined.keys() - entries.keys():
                self._crashes.pop(lifted, None)
            self._quarantined = entries
            self._write_or_log()

    def _read(self) -> dict[str, Any]:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            log.warning("journal_unreadable", path=str(self.path), error=str(exc))
            return {}
        return data if isinstance(data, dict) and data.get("format") == _FORMAT else {}

    def _write(self) -> None:
        data = {
            "format": _FORMAT,
            "pending": self._pending,
            "crashes": self._crashes,
            "quarantined": self._quarantined,
        }
        try:
            write_atomic(self.path, json.dumps(data, indent=1, sort_keys=True))
        except OSError as exc:
            why = exc.strerror or str(exc)
            raise JournalUnwritable(f"cannot write the journal {self.path}: {why}") from exc

    def _write_or_log(self) -> None:
        """Write, or log why not: what is in memory goes out with the next write that works."""
        try:
            self._write()
        except JournalUnwritable as exc:
            log.warning("journal_unwritable", error=str(exc))
