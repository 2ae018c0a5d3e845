"""The bench's result files: each repeat's pair shown beside the median, and saved results
rendered again from their JSON."""

from __future__ import annotations

import json
import math
from pathlib import Path

from bench.metrics import PointStats
from bench.report import Point, Report
from lmx.runtime.steptrace import Step


def _run(tok_s: float) -> PointStats:
    return PointStats(
        concurrency=2,
        requests=4,
        errors=0,
        output_tokens=256,
        wall_s=256 / tok_s,
        output_tok_s=tok_s,
        ttft_p50_ms=30.0,
        ttft_p99_ms=40.0,
        ttft_mean_ms=31.0,
        itl_p50_ms=8.0,
        itl_p99_ms=12.0,
        tpot_mean_ms=8.5,
        chunks_per_token=1.0,
    )


def _report() -> Report:
    raw = (_run(100.0), _run(200.0), _run(150.0))
    lmx = (_run(50.0), _run(200.0), _run(135.0))
    steps = (Step(t=10.0, ms=20.0, decoded=0, prompted=2, started=0), Step(10.02, 8.0, 2, 0, 0))
    point = Point(
        concurrency=2,
        raw=raw[2],
        lmx=lmx[2],
        raw_runs=raw,
        lmx_runs=lmx,
        steps={"raw": steps, "lmx": steps},
    )
    return Report(
        preset="tiny",
        device="cpu",
        settings={"prompt_tokens": 64, "output_tokens": 64, "max_batch": 32, "repeats": 3},
        versions={"lmx": "0"},
        started_at="2026-12-02 07:00 UTC",
        points=[point],
        duration_s=12.0,
    )


def test_the_ratio_is_the_median_pair_shown_with_the_lowest_and_highest() -> None:
    point = _report().points[0]
    assert point.pair_ratios == [0.5, 1.0, 0.9]
    assert point.ratio == 0.9
    assert point.raw_spread == 2.0
    row = next(line for line in _report().to_markdown().splitlines() if line.startswith("| 2 |"))
    assert "| **0.90** ✗ (0.50–1.00) | 2.00 |" in row


def test_saved_results_render_again_from_their_json(tmp_path: Path) -> None:
    saved = json.loads(json.dumps(_report().to_json()))
    again = Report.from_json(saved)
    assert again.to_json() == saved
    assert again.to_markdown() == _report().to_markdown()
    # The steps' times count from each run's first step once saved.
    assert [s.t for s in again.points[0].steps["lmx"]] == [0.0, 0.02]
    written = again.write(tmp_path, "throughput-renamed")
    assert {p.name for p in written} >= {"throughput-renamed.json", "throughput-renamed.md"}
    assert math.isnan(
        json.loads((tmp_path / "throughput-renamed.json").read_text())["points"][0]["lmx"][
            "queue_ms"
        ]
    )
