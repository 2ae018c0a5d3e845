"""Pooling the rounds of several bench.worker_ab runs: per concurrency and pair of modes, every
round of the runs that ran both; runs of another workload refused, naming what differs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from bench.pool_ab import Run, main, pool
from bench.report import read_json

SETTINGS = {"requests": 2, "prompt_tokens": 64, "output_tokens": 64, "processes": True}


def _run(blocks: dict[int, dict[str, list[list[float]]]], **settings: Any) -> Any:
    """A worker_ab result: per concurrency, per mode, its rounds' (wall ms, CPU ms, block s)."""
    return {
        "model": "tiny",
        "device": "here",
        "started_at": "2026-12-04 16:00 UTC",
        "settings": {**SETTINGS, "modes": sorted({m for b in blocks.values() for m in b})}
        | settings,
        "pids": {},
        "points": [{"concurrency": c, "blocks": b, "pairs": {}} for c, b in blocks.items()],
    }


def _rounds(*walls: float) -> list[list[float]]:
    return [[w, w, w / 10] for w in walls]


FIRST = _run(
    {
        1: {"raw": _rounds(5, 5, 6), "again": _rounds(5, 4, 6), "thread": _rounds(10, 5, 3)},
        16: {"raw": _rounds(8), "thread": _rounds(16)},
    },
)
SECOND = _run({1: {"raw": _rounds(4, 4), "hosted": _rounds(2, 8), "thread": _rounds(8, 4)}})


def test_pools_each_pair_over_the_runs_that_ran_both() -> None:
    pooled = pool([Run.from_json("first", FIRST), Run.from_json("second", SECOND)])
    assert list(pooled) == [1, 16]
    at_1 = pooled[1]
    # in MODES' order, only the pairs some run ran together
    assert list(at_1) == [
        ("raw", "again"),
        ("raw", "hosted"),
        ("raw", "thread"),
        ("again", "thread"),
        ("hosted", "thread"),
    ]
    raw_thread = at_1["raw", "thread"]
    assert raw_thread.runs == 2
    wall, cpu, block = raw_thread.measures
    assert wall.values == (0.5, 1.0, 2.0, 0.5, 1.0)  # the first run's rounds, then the second's
    assert raw_thread.draws.values == (1.0, 0.75)  # a run from before draws is one draw
    assert cpu.values == wall.values
    assert block.values == pytest.approx(wall.values)
    assert at_1["raw", "hosted"].runs == 1
    assert at_1["raw", "hosted"].measures[0].values == (2.0, 0.5)
    assert list(pooled[16]) == [("raw", "thread")]
    assert pooled[16]["raw", "thread"].measures[0].values == (0.5,)


def test_pools_the_mode_only_processes_run() -> None:
    tuned = _run({1: {"raw": _rounds(1, 2), "tuned": _rounds(2, 1)}})
    pooled = pool([Run.from_json("a", tuned), Run.from_json("b", tuned)])
    assert list(pooled[1]) == [("raw", "tuned")]
    assert pooled[1]["raw", "tuned"].measures[0].values == (0.5, 2.0, 0.5, 2.0)


def test_writes_the_pooled_tables(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    files = []
    for name, data in (("first", FIRST), ("second", SECOND)):
        files.append(tmp_path / f"worker-ab-{name}.json")
        files[-1].write_text(json.dumps(data))
    main([str(tmp_path / "pooled"), *map(str, files)])
    assert "wrote" in capsys.readouterr().out
    markdown = (tmp_path / "pooled.md").read_text()
    assert (
        "# bench.worker_ab pooled: 2 runs of `tiny`, each mode in a process of its own" in markdown
    )
    assert (
        "- worker-ab-first.json: `here`, 2026-12-04 16:00 UTC, modes again, raw, thread;"
        in markdown
    )
    assert "3 rounds at 1, 1 rounds at 16" in markdown
    assert "| raw/thread | 2 | 1.000 [too few], 0.871, 2 of 5 below 1, p = 1 |" in markdown
    assert "## 16 streams" in markdown
    data = read_json(tmp_path / "pooled.json.gz")
    assert [r["file"] for r in data["runs"]] == ["worker-ab-first.json", "worker-ab-second.json"]
    pair = data["points"][0]["pairs"]["raw/thread"]
    assert pair["runs"] == 2
    assert pair["wall"]["values"] == [0.5, 1.0, 2.0, 0.5, 1.0]


@pytest.mark.parametrize(
    ("second", "message"),
    [
        (_run({1: {"raw": _rounds(1), "thread": _rounds(1)}}, processes=False), "processes"),
        (_run({1: {"raw": _rounds(1), "thread": _rounds(1)}}, output_tokens=32), "output"),
        ({**FIRST, "model": "other"}, "model other, not tiny as a.json"),
        (
            _run({1: {"raw": _rounds(1), "tuned": _rounds(1)}}, glibc_tunables={"raw": ""}),
            "glibc_tunables {'raw': ''}, not None",
        ),
    ],
)
def test_refuses_runs_of_another_workload_naming_it(
    second: Any, message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "a.json").write_text(json.dumps(FIRST))
    (tmp_path / "b.json").write_text(json.dumps(second))
    with pytest.raises(SystemExit):
        main([str(tmp_path / "pooled"), str(tmp_path / "a.json"), str(tmp_path / "b.json")])
    err = capsys.readouterr().err
    assert "b.json: " in err
    assert message in err
    assert not (tmp_path / "pooled.md").exists()


def test_a_file_that_is_not_a_result_is_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "throughput.json"
    bad.write_text(json.dumps({"preset": "tiny", "points": []}))
    with pytest.raises(SystemExit):
        main([str(tmp_path / "pooled"), str(bad)])
    assert "throughput.json: not a bench.worker_ab result (KeyError: 'model')" in (
        capsys.readouterr().err
    )


def test_a_result_with_an_unknown_mode_is_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    odd = tmp_path / "odd.json"
    odd.write_text(json.dumps(_run({1: {"raw": _rounds(1), "warp": _rounds(1)}})))
    with pytest.raises(SystemExit):
        main([str(tmp_path / "pooled"), str(odd)])
    assert "odd.json: not a bench.worker_ab result (ValueError: unknown modes warp)" in (
        capsys.readouterr().err
    )
