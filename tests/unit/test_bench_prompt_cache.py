"""bench.prompt_cache: both caches run every operation, and the report sets them side by side."""

from __future__ import annotations

from pathlib import Path

from bench import prompt_cache


def test_both_sides_time_every_operation_and_the_report_compares_them(tmp_path: Path) -> None:
    prompt_cache.main(["--out", str(tmp_path), "--tokens", "16,64", "--ops", "3"])
    doc = (tmp_path / "prompt-cache.md").read_text()
    rows = [
        line for line in doc.splitlines() if line.startswith("| 16 ") or line.startswith("| 64 ")
    ]
    assert len(rows) == 2 * 2 * len(prompt_cache.OPS)  # sizes x with and without system prompt
    assert "| 64 | 16 | fetch new |" in doc  # a quarter of the conversation is shared
    assert all(line.endswith("x |") for line in rows)


def test_a_side_over_its_budget_stops_and_says_how_many_runs_it_had() -> None:
    rows = prompt_cache.measure(32, shared=True, ops=4, budget_s=0.0)
    assert {r["runs"] for r in rows} == {1}  # the deadline is checked before each next run
    assert {(r["side"], r["op"]) for r in rows} == {
        (side, op) for side in ("mlx-lm", "lmx") for op in prompt_cache.OPS
    }
