"""Kept responses on disk (lmx.api.response_shelf): a store reopened holds what it held."""

from __future__ import annotations

import contextlib
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from lmx.api.response_store import Kept, ResponseStore, listed_items
from lmx.errors import ResponseNotFound


def _keep(store: ResponseStore, rid: str, said: str, previous: str | None = None) -> None:
    """Keep response `rid`, answering `said` after the conversation of `previous`."""
    before = store.conversation(previous) if previous else ()
    question = {"role": "user", "content": said}
    answer = {"role": "assistant", "content": said.upper(), "reasoning_content": "so"}
    response = {"id": rid, "object": "response", "output_text": said.upper()}
    store.keep(Kept(response, (*before, question, answer), listed_items(said), 100), previous)


def _rows(path: Path, table: str) -> int:
    with contextlib.closing(sqlite3.connect(path)) as db:
        count: int = db.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
    return count


def _ids(path: Path) -> list[str]:
    with contextlib.closing(sqlite3.connect(path)) as db:
        return sorted(row[0] for row in db.execute("SELECT id FROM response"))


def _said(store: ResponseStore, rid: str) -> list[Any]:
    return [m["content"] for m in store.conversation(rid)]


def test_kept_responses_outlive_their_store_and_keep_their_order_of_use(tmp_path: Path) -> None:
    path = tmp_path / "responses.db"
    store = ResponseStore.on_disk(path)
    _keep(store, "a", "one")
    _keep(store, "b", "two", previous="a")
    _keep(store, "c", "three")
    items = store.input_items("b", limit=20, order="asc", after=None)
    store.get("b")  # b used, and a before it: c is now the least recently used
    store.close()
    assert path.stat().st_mode & 0o777 == 0o600  # conversations: the user's alone to read
    # The conversation a and b share is on disk once.
    assert (_rows(path, "response"), _rows(path, "message")) == (3, 6)

    again = ResponseStore.on_disk(path)
    assert (len(again), again.nbytes) == (3, 300)
    assert again.get("b") == {"id": "b", "object": "response", "output_text": "TWO"}
    assert _said(again, "b") == ["one", "ONE", "two", "TWO"]
    assert again.input_items("b", limit=20, order="asc", after=None) == items
    assert again.continued("c")[-1] == {
        "role": "assistant",
        "content": "THREE",
        "reasoning_content": "so",
    }
    # Full, it drops the least recently used before the restart: c (continued just now: a).
    again.max_bytes = again.nbytes
    again.get("b")
    _keep(again, "d", "four")
    with pytest.raises(ResponseNotFound):
        again.get("c")
    again.close()
    assert _ids(path) == ["a", "b", "d"]


def test_a_deleted_response_leaves_the_disk_with_the_messages_no_other_holds(
    tmp_path: Path,
) -> None:
    path = tmp_path / "responses.db"
    store = ResponseStore.on_disk(path)
    _keep(store, "a", "one")
    _keep(store, "b", "two", previous="a")
    store.delete("a")  # b keeps its conversation, a's messages with it
    store.close()
    assert (_rows(path, "response"), _rows(path, "message")) == (1, 4)
    store = ResponseStore.on_disk(path)
    assert _said(store, "b") == ["one", "ONE", "two", "TWO"]
    store.delete("b")
    store.close()
    assert (_rows(path, "response"), _rows(path, "message")) == (0, 0)
    _keep(store, "c", "late")  # after the daemon's shutdown began: in memory alone
    assert _said(store, "c") == ["late", "LATE"] and _rows(path, "response") == 0


def test_a_smaller_store_reopened_holds_the_most_recently_used(tmp_path: Path) -> None:
    path = tmp_path / "responses.db"
    store = ResponseStore.on_disk(path)
    for rid in "abc":
        _keep(store, rid, rid)
    store.get("a")
    store.close()
    store = ResponseStore.on_disk(path, max_bytes=200)
    assert len(store) == 2
    with pytest.raises(ResponseNotFound):
        store.get("b")  # the least recently used
    store.close()
    assert _ids(path) == ["a", "c"]


@pytest.mark.parametrize("kind", ["not a database", "a newer lmx's"])
def test_a_file_it_cannot_read_is_moved_aside_and_a_new_one_begun(
    tmp_path: Path, kind: str
) -> None:
    path = tmp_path / "responses.db"
    if kind == "not a database":
        path.write_bytes(b"garbage " * 1000)
    else:
        with contextlib.closing(sqlite3.connect(path)) as db:
            db.execute("PRAGMA user_version = 99")
    before = path.read_bytes()
    store = ResponseStore.on_disk(path)
    _keep(store, "a", "one")
    store.close()
    (aside,) = tmp_path.glob("responses.db.unreadable-*")
    assert aside.read_bytes() == before  # nothing of it lost
    assert _said(ResponseStore.on_disk(path), "a") == ["one", "ONE"]
