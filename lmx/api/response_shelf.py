"""The kept responses on disk, so that a conversation continued by `previous_response_id` outlives
a restart of the daemon (an upgrade, launchd bringing it back after a crash).

A ResponseStore (lmx.api.response_store) holds them in memory and tells its shelf each change; the
shelf writes them, in the order made, on a thread of its own (the JSON too): a request never waits
for the disk, and a crash loses at most the changes of its last moments. SQLite, one file per
store: a response a row (its answer, input items and the hashes of its conversation's messages), a
message a row counted by the conversations that hold it, so that a conversation continued 100
times is on disk about once, as it is in memory.
"""

from __future__ import annotations

import contextlib
import hashlib
import sqlite3
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson
import structlog

if TYPE_CHECKING:
    from lmx.api.response_store import Kept

log = structlog.get_logger(__name__)

_VERSION = 1
_SCHEMA = """
CREATE TABLE message (hash BLOB PRIMARY KEY, body BLOB NOT NULL, refs INTEGER NOT NULL);
CREATE TABLE response (
    id TEXT PRIMARY KEY, used INTEGER NOT NULL, previous TEXT, body BLOB NOT NULL,
    items BLOB NOT NULL, messages BLOB NOT NULL, nbytes INTEGER NOT NULL
);
"""
_HASH = 16  # bytes of a message's hash


# A response shelved: its id, the one it continued, its answer, conversation, input items and
# size (as lmx.api.response_store.Kept counts it).
Shelved = tuple[
    str, str | None, dict[str, Any], tuple[dict[str, Any], ...], tuple[dict[str, Any], ...], int
]


class Shelf:
    """One store's responses in the SQLite file at `path` (see `open_shelf`)."""

    def __init__(self, path: Path, db: sqlite3.Connection) -> None:
        self.path = path
        self._db = db
        self._used = db.execute("SELECT coalesce(max(used), 0) FROM response").fetchone()[0]
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="shelf")
        self._failed = False
        self._closed = False

    def load(self) -> list[Shelved]:
        """Every response shelved, the least recently used first; a message shared by several
        conversations is one object in all of them."""
        messages = {
            h: orjson.loads(body) for h, body in self._db.execute("SELECT hash, body FROM message")
        }
        rows = self._db.execute(
            "SELECT id, previous, body, items, messages, nbytes FROM response ORDER BY used"
        )
        out = []
        for rid, previous, body, items, hashes, nbytes in rows:
            keys = _hashes(hashes)
            if any(k not in messages for k in keys):  # never written so; skip rather than fail
                log.warning("response_shelf_incomplete", id=rid, path=str(self.path))
                continue
            conversation = tuple(messages[k] for k in keys)
            answer, listed = orjson.loads(body), tuple(orjson.loads(items))
            out.append((rid, previous, answer, conversation, listed, nbytes))
        return out

    def put(self, kept: Kept, previous: str | None) -> None:
        """Shelve a response (`previous`: the one it continued), the most recently used."""
        self._used += 1
        used = self._used

        def write(db: sqlite3.Connection) -> None:
            rid = kept.response["id"]
            try:
                body, items = orjson.dumps(kept.response), orjson.dumps(kept.items)
                messages = [orjson.dumps(m, option=orjson.OPT_SORT_KEYS) for m in kept.conversation]
            except TypeError as exc:  # kept in memory all the same
                log.warning("response_not_shelved", id=rid, error=str(exc))
                return
            hashes = [hashlib.blake2b(m, digest_size=_HASH).digest() for m in messages]
            db.executemany(
                "INSERT INTO message VALUES (?, ?, 1)"
                " ON CONFLICT (hash) DO UPDATE SET refs = refs + 1",
                zip(hashes, messages, strict=True),
            )
            row = (rid, used, previous, body, items, b"".join(hashes), kept.nbytes)
            db.execute("INSERT INTO response VALUES (?, ?, ?, ?, ?, ?, ?)", row)

        self._submit(write)

    def touch(self, ids: list[str]) -> None:
        """These responses were used, in this order, the last the most recently."""
        rows = []
        for rid in ids:
            self._used += 1
            rows.append((self._used, rid))
        self._submit(lambda db: db.executemany("UPDATE response SET used = ? WHERE id = ?", rows))

    def drop(self, ids: list[str]) -> None:
        """Forget these responses, and the messages no other one holds."""

        def write(db: sqlite3.Connection) -> None:
            for rid in ids:
                row = db.execute("SELECT messages FROM response WHERE id = ?", (rid,)).fetchone()
                if row is None:
                    continue
                hashes = [(h,) for h in _hashes(row[0])]
                db.executemany("UPDATE message SET refs = refs - 1 WHERE hash = ?", hashes)
                db.executemany("DELETE FROM message WHERE hash = ? AND refs <= 0", hashes)
                db.execute("DELETE FROM response WHERE id = ?", (rid,))

        self._submit(write)

    def close(self) -> None:
        """Write what is left, then close the file; later changes stay in memory."""
        self._closed = True
        self._writer.shutdown(wait=True)
        self._db.close()

    def _submit(self, write: Callable[[sqlite3.Connection], object]) -> None:
        if self._closed:  # a request ending after the daemon's shutdown began
            log.info("response_shelf_closed", path=str(self.path))
            return

        def run() -> None:
            try:
                with _transaction(self._db):
                    write(self._db)
            except sqlite3.Error as exc:  # the disk full, say: memory keeps serving
                if not self._failed:
                    log.warning("response_shelf_write_failed", path=str(self.path), error=str(exc))
                self._failed = True
            else:
                self._failed = False

        self._writer.submit(run)


def open_shelf(path: Path) -> tuple[Shelf, list[Shelved]]:
    """The shelf in the SQLite file at `path`, created if absent, and what it holds (see
    Shelf.load). A file that cannot be read as one is moved aside (renamed with the time, never
    deleted) and a new one begun."""
    db = None
    try:
        db = _connect(path)
        shelf = Shelf(path, db)
        return shelf, shelf.load()
    except (sqlite3.DatabaseError, orjson.JSONDecodeError) as exc:
        if db is not None:
            db.close()
        aside = path.with_name(f"{path.name}.unreadable-{time.strftime('%Y%m%dT%H%M%S')}")
        for suffix in ("", "-wal", "-shm"):  # its write-ahead log goes with it
            with contextlib.suppress(FileNotFoundError):
                path.with_name(path.name + suffix).rename(aside.with_name(aside.name + suffix))
        log.warning(
            "response_shelf_unreadable", path=str(path), moved_to=str(aside), error=str(exc)
        )
        return Shelf(path, _connect(path)), []


def _connect(path: Path) -> sqlite3.Connection:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch(mode=0o600)  # conversations: the user's alone to read (its log files take its mode)
    # Used by the writer thread once open; the opening thread only loads before any write.
    db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
    try:
        version = db.execute("PRAGMA user_version").fetchone()[0]  # before anything changes it
        if version not in (0, _VERSION):
            raise sqlite3.DatabaseError(f"schema version {version}, this lmx reads {_VERSION}")
        db.execute("PRAGMA journal_mode = WAL")
        db.execute("PRAGMA synchronous = NORMAL")  # durable at each checkpoint, never corrupt
        if version == 0:
            with _transaction(db):
                for statement in filter(str.strip, _SCHEMA.split(";")):
                    db.execute(statement)
                db.execute(f"PRAGMA user_version = {_VERSION}")
    except BaseException:
        db.close()
        raise
    return db


@contextlib.contextmanager
def _transaction(db: sqlite3.Connection) -> Iterator[None]:
    """One transaction on `db` (opened in autocommit mode): committed, or rolled back on error."""
    with db:
        db.execute("BEGIN")
        yield


def _hashes(joined: bytes) -> list[bytes]:
    """A response's message hashes, as its row joins them."""
    return [joined[i : i + _HASH] for i in range(0, len(joined), _HASH)]
