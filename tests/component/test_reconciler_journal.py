"""The intent journal on disk: what one process leaves, the next one recovers."""

from __future__ import annotations

import json
from pathlib import Path

from structlog.testing import capture_logs

from lmx.reconciler.journal import Intent, Journal, Quarantine


def test_a_finished_side_effect_leaves_nothing_pending(tmp_path: Path) -> None:
    j = Journal(tmp_path / "journal.json")
    j.begin(Intent.LOAD, "a", "d1")
    assert json.loads(j.path.read_text())["pending"]["load:a"]["digest"] == "d1"
    j.end(Intent.LOAD, "a", ok=True)
    assert json.loads(j.path.read_text())["pending"] == {}
    assert not list(tmp_path.glob(".*.tmp"))  # written by rename, nothing left behind


def test_a_load_interrupted_twice_by_death_is_reported_for_quarantine(tmp_path: Path) -> None:
    path = tmp_path / "journal.json"
    first = Journal(path)
    first.recover()
    first.begin(Intent.LOAD, "a", "d1")  # ... and the process dies here
    assert Journal(path).recover().crash_quarantined("a", "d1") == 0
    second = Journal(path)
    second.recover()
    second.begin(Intent.LOAD, "a", "d1")  # dies again
    recovery = Journal(path).recover()
    assert recovery.crash_quarantined("a", "d1") == 2
    assert recovery.crash_quarantined("a", "other-config") == 0


def test_a_successful_load_clears_the_crash_count(tmp_path: Path) -> None:
    path = tmp_path / "journal.json"
    j = Journal(path)
    j.begin(Intent.LOAD, "a", "d1")
    j = Journal(path)
    assert j.recover().crashed_loads == {"a": ("d1", 1)}
    j.begin(Intent.LOAD, "a", "d1")
    j.end(Intent.LOAD, "a", ok=True)
    assert Journal(path).recover().crashed_loads == {}


def test_an_interrupted_download_is_resumed_and_stays_recorded_until_it_ends(
    tmp_path: Path,
) -> None:
    path = tmp_path / "journal.json"
    Journal(path).begin(Intent.DOWNLOAD, "big", "d1")
    j = Journal(path)
    assert j.recover().downloads == frozenset({"big"})
    assert Journal(path).recover().downloads == frozenset({"big"})
    j2 = Journal(path)
    j2.recover()
    j2.end(Intent.DOWNLOAD, "big", ok=True)
    assert Journal(path).recover().downloads == frozenset()


def test_a_delete_interrupted_by_death_is_reported_once_and_not_redone(tmp_path: Path) -> None:
    path = tmp_path / "journal.json"
    Journal(path).begin(Intent.DELETE, "old", "d1")
    with capture_logs() as logs:
        recovery = Journal(path).recover()
        Journal(path).recover()
    assert [(e["event"], e["model"]) for e in logs] == [("delete_interrupted_by_exit", "old")]
    assert recovery.downloads == frozenset() and recovery.crashed_loads == {}


def test_an_unreadable_journal_starts_empty(tmp_path: Path) -> None:
    path = tmp_path / "journal.json"
    path.write_text("{not json")
    recovery = Journal(path).recover()
    assert recovery.downloads == frozenset() and recovery.crashed_loads == {}
    assert json.loads(path.read_text())["format"] == 1


def test_the_models_quarantined_are_kept_until_lifted(tmp_path: Path) -> None:
    path = tmp_path / "journal.json"
    held = Quarantine("spec1", "EngineCrashed", "the worker died (crash 5 in a row)")
    j = Journal(path)
    j.recover()
    j.set_quarantined({"a": held})
    j.begin(Intent.LOAD, "b", "d1")
    j.end(Intent.LOAD, "b", ok=True)
    assert Journal(path).recover().quarantined == {"a": held}
    j = Journal(path)
    j.recover()  # recovering keeps them: lifting is the reconciler's decision
    assert Journal(path).recover().quarantined == {"a": held}
    j.set_quarantined({})
    assert Journal(path).recover().quarantined == {}


def test_a_lifted_quarantine_forgets_the_loads_that_ended_the_process(tmp_path: Path) -> None:
    path = tmp_path / "journal.json"
    for _ in range(2):  # two processes died loading "a"
        j = Journal(path)
        j.recover()
        j.begin(Intent.LOAD, "a", "d1")
    j = Journal(path)
    assert j.recover().crash_quarantined("a", "d1") == 2
    j.set_quarantined({"a": Quarantine("spec1", "LoadCrashedProcess", "...")})
    assert Journal(path).recover().crash_quarantined("a", "d1") == 2
    j.set_quarantined({})
    assert Journal(path).recover().crashed_loads == {}
