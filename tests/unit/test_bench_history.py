"""One workload's lmx/raw across builds: entries of runs and pools, their order, cells, files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.history import History, read_entry
from bench.history import main as history_main
from bench.pool import Pool
from bench.pool import main as pool_main
from bench.report import Point, Report, read_json
from tests.unit.bench_runs import run_at

RESULTS = Path(__file__).parents[2] / "bench" / "results"


def _run(ratios: list[float], started_at: str, *, tokens: int = 64) -> Report:
    """One run whose point at 2 streams has these lmx/raw pairs."""
    raw = tuple(run_at(1000.0) for _ in ratios)
    lmx = tuple(run_at(1000.0 * r) for r in ratios)
    point = Point(concurrency=2, raw=raw[0], lmx=lmx[0], raw_runs=raw, lmx_runs=lmx)
    return Report(
        preset="tiny",
        device="cpu",
        settings={"prompt_tokens": tokens, "output_tokens": 64, "max_batch": 32},
        versions={"lmx": "0"},
        started_at=started_at,
        points=[point],
    )


def _write(path: Path, report: Report) -> Path:
    path.write_text(json.dumps(report.to_json()))
    return path


def test_entries_go_in_the_order_they_ran_each_cell_its_pairs_median_interval_and_verdict(
    tmp_path: Path,
) -> None:
    met = _write(
        tmp_path / "throughput-tiny-cpu-new.json", _run([0.97] * 8, "2026-12-08 10:00 UTC")
    )
    below = _run([0.90] * 8, "2026-12-07 09:00 UTC")
    wide = _run([0.90, 1.10] * 4, "2026-12-07 12:00 UTC")
    a, b = _write(tmp_path / "a.json", below), _write(tmp_path / "b.json", wide)
    pool_main([str(tmp_path / "pooled-tiny-cpu-old"), str(a), str(b)])
    pooled = tmp_path / "pooled-tiny-cpu-old.json.gz"
    alone = _write(
        tmp_path / "throughput-tiny-cpu-few.json", _run([1.0] * 3, "2026-12-07 09:00 UTC")
    )
    entries = [read_entry(f, read_json(f)) for f in (met, pooled, alone)]
    history = History.of(entries)
    # Two entries began with runs at 09:00: the one whose runs ended first ran first.
    assert [e.label for e in history.entries] == ["cpu-few", "cpu-old", "cpu-new"]
    assert [len(e.pool.runs) for e in history.entries] == [1, 2, 1]
    rows = [line for line in history.to_markdown().splitlines() if line.startswith("| 2026")]
    assert rows[:3] == [
        "| 2026-12-07 09:00 UTC | [cpu-few](throughput-tiny-cpu-few.md) | 1 | 1.00 [too few] (3) |",
        "| 2026-12-07 09:00 UTC | [cpu-old](pooled-tiny-cpu-old.md) | 2 | 0.90 [0.90–1.10] (16) |",
        "| 2026-12-08 10:00 UTC | [cpu-new](throughput-tiny-cpu-new.md) | 1 "
        "| **0.97 [0.97–0.97] (8)** |",
    ]
    # lmx's own time: these runs have no step records, so none.
    assert [r.rsplit("|", 2)[1] for r in rows[3:]] == [" — "] * 3
    only_below = History.of([read_entry(a, read_json(a))])
    assert "| _0.90 [0.90–0.90] (8)_ |" in only_below.to_markdown()


def test_entries_of_other_workloads_do_not_go_together(tmp_path: Path) -> None:
    a = _write(tmp_path / "a.json", _run([1.0], "2026-12-07 09:00 UTC"))
    b = _write(tmp_path / "b.json", _run([1.0], "2026-12-07 10:00 UTC", tokens=128))
    with pytest.raises(
        ValueError, match=r"b\.json ran prompt_tokens=128, a\.json prompt_tokens=64"
    ):
        History.of([read_entry(f, read_json(f)) for f in (a, b)])


def test_the_saved_qwen3_results_tell_the_history_bench_readme_tells(tmp_path: Path) -> None:
    names = [
        "throughput-qwen3-0.6b-h100-7a8d9d7.json.gz",
        "pooled-qwen3-0.6b-h100-1637bd7.json.gz",  # its runs' names as they are saved
        "pooled-qwen3-0.6b-h100-4eaede7.json.gz",
    ]
    history_main([str(tmp_path / "history"), *(str(RESULTS / n) for n in names)])
    data = read_json(tmp_path / "history.json.gz")
    assert [e["label"] for e in data["entries"]] == ["h100-1637bd7", "h100-4eaede7", "h100-7a8d9d7"]
    by = {e["label"]: {p["concurrency"]: p for p in e["points"]} for e in data["entries"]}
    assert [by["h100-1637bd7"][c]["verdict"] for c in (1, 2, 4, 8, 16, 32)] == [
        "undecided",
        *["met"] * 5,
    ]
    assert [by["h100-4eaede7"][c]["lmx_raw"]["n"] for c in (2, 4, 8, 16, 32)] == [
        138,
        40,
        10,
        40,
        10,
    ]
    assert [round(by["h100-7a8d9d7"][c]["lmx_raw"]["median"], 2) for c in (2, 16)] == [1.03, 1.03]
    assert all(p["own"]["interval"][0] >= 0.95 for e in by.values() for p in e.values())
    assert (tmp_path / "history.md").read_text().startswith("# lmx/raw across builds")
    assert (tmp_path / "history.png").stat().st_size > 0  # matplotlib: the bench extra, in dev's


def test_a_pool_whose_runs_are_not_beside_it_is_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = _write(tmp_path / "run.json", _run([1.0] * 6, "2026-12-07 09:00 UTC"))
    Pool.of([(run.name, Report.from_json(read_json(run)))]).write(tmp_path / "pooled-x")
    run.unlink()
    with pytest.raises(SystemExit):
        history_main([str(tmp_path / "out"), str(tmp_path / "pooled-x.json.gz")])
    err = capsys.readouterr().err
    assert "pooled-x.json.gz: not a throughput run or pool (FileNotFoundError" in err
    assert "run.json" in err
    assert not (tmp_path / "out.json.gz").exists()
