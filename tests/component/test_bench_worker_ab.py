"""bench.worker_ab on the real tiny model: every mode runs its blocks to the end, and the pairs
it reports are the rounds' ratios of what it measured."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.worker_ab import MODES, main

ROUNDS = 6  # the fewest rounds whose median has a 95% interval


def test_alternates_every_mode_and_pools_the_rounds(tiny_model_dir: Path, tmp_path: Path) -> None:
    main(
        [
            *("--model", str(tiny_model_dir), "--concurrency", "1,2", "--requests", "1"),
            *("--seconds", "120", "--max-rounds", str(ROUNDS), "--device-label", "here"),
            *("--out", str(tmp_path)),
        ]
    )
    stem = f"worker-ab-{tiny_model_dir.name}-here"
    data = json.loads((tmp_path / f"{stem}.json").read_text())
    assert [p["concurrency"] for p in data["points"]] == [1, 2]
    for point in data["points"]:
        blocks = point["blocks"]
        assert list(blocks) == list(MODES)
        assert all(len(rows) == ROUNDS for rows in blocks.values())
        assert all(min(row) > 0 for rows in blocks.values() for row in rows)
        # a block holds its request's 63 decode steps: half of them take less than it does
        assert all(32 * ms / 1e3 < s for rows in blocks.values() for ms, _, s in rows)
        pairs = point["pairs"]["raw/thread"]
        for i, key in enumerate(("wall", "cpu", "block")):
            ratios = [r[i] / t[i] for r, t in zip(blocks["raw"], blocks["thread"], strict=True)]
            assert pairs[key]["values"] == pytest.approx(ratios)
            assert pairs[key]["interval"] is not None
        assert len(point["pairs"]) == len(MODES) * (len(MODES) - 1) // 2
    markdown = (tmp_path / f"{stem}.md").read_text()
    assert "## 2 streams, 6 rounds" in markdown
    assert "| nocache/" not in markdown  # nocache is the last mode: only ever b of a pair
    assert "| quiet/nocache |" in markdown
    assert "| mode | decode step ms, wall | CPU | whole block s |" in markdown


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--modes", "raw,threads"],
            "--modes: unknown threads; known: raw, thread, inline, quiet, nocache",
        ),
        (["--modes", "raw"], "--modes: name two or more"),
        (["--concurrency", "1,x"], "--concurrency: '1,x' is not a list of numbers such as 1,16"),
        (["--concurrency", "0"], "--concurrency: 0 is below 1"),
        (["--output-tokens", "1"], "--output-tokens: 1 is below 2"),
        (["--step-cpu", "100000"], "--step-cpu: 100000 is not among this process's CPUs"),
    ],
)
def test_names_what_is_wrong_with_its_arguments(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        main(args)
    assert message in capsys.readouterr().err
