"""Pooling the pairs of several throughput runs: the median's interval, the verdicts, the files."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from bench.pool import Pool
from bench.pool import main as pool_main
from bench.report import Point, Report, read_json
from tests.unit.bench_runs import run_at

RESULTS = Path(__file__).parents[2] / "bench" / "results"


def _report(ratios: list[float], *, preset: str = "tiny", tokens: int = 64) -> Report:
    """One run whose point at 8 streams has these lmx/raw pairs (raw at 1000 tok/s)."""
    raw = tuple(run_at(1000.0, concurrency=8) for _ in ratios)
    lmx = tuple(run_at(1000.0 * r, concurrency=8) for r in ratios)
    point = Point(concurrency=8, raw=raw[0], lmx=lmx[0], raw_runs=raw, lmx_runs=lmx)
    return Report(
        preset=preset,
        device="cpu",
        settings={"prompt_tokens": tokens, "output_tokens": 64, "max_batch": 32, "repeats": 3},
        versions={"lmx": "0"},
        started_at="2026-12-03 08:00 UTC",
        points=[point],
    )


def test_decode_steps_pool_raw_s_mean_decode_step_over_lmx_s_and_their_cpu_time() -> None:
    report = _report([1.0, 1.0, 1.0, 1.0, 1.0, 1.0])
    (point,) = report.points
    raw = tuple(replace(r, decode_step_ms=10.0, decode_cpu_ms=9.9) for r in point.raw_runs)
    lmx = tuple(  # lmx's thread waited 0.6 ms more in five of six: the same CPU time
        replace(x, decode_step_ms=d, decode_cpu_ms=9.9)
        for x, d in zip(point.lmx_runs, [10.5] * 5 + [9.5], strict=True)
    )
    report = replace(report, points=[replace(point, raw_runs=raw, lmx_runs=lmx)])
    pool = Pool.of([("a.json", report)])
    decode = pool.points[0].series["decode"]
    assert decode.values == pytest.approx([10 / 10.5] * 5 + [10 / 9.5])
    assert decode.below_1 == 5
    row = next(line for line in pool.to_markdown().splitlines() if line.startswith("| 8 |"))
    assert "| 0.952 [0.952–1.053], 5 of 6, p = 0.22 | 1.000 [1.000–1.000], 0 of 6, p = nan |" in row
    assert pool.points[0].series["decode_cpu"].values == pytest.approx([1.0] * 6)
    # Runs without step records (no decode step time) leave the column empty.
    plain = Pool.of([("b.json", _report([1.0] * 6))])
    assert plain.points[0].series["decode"].n == 0
    row = next(line for line in plain.to_markdown().splitlines() if line.startswith("| 8 |"))
    assert (
        row == "| 8 | 6 | 1.00 [1.00–1.00] | 1.000 | 0 of 6 | 0.0% | — | — | — | — | — | met | 0 |"
    )


def test_runs_pool_their_pairs_per_concurrency() -> None:
    pool = Pool.of([("a.json", _report([0.9, 1.0, 1.1])), ("b.json", _report([0.95, 1.05, 1.0]))])
    (point,) = pool.points
    assert point.concurrency == 8
    lmx_raw = point.series["lmx_raw"]
    assert sorted(lmx_raw.values) == pytest.approx([0.9, 0.95, 1.0, 1.0, 1.05, 1.1])
    assert lmx_raw.median == pytest.approx(1.0) and lmx_raw.below_1 == 2
    assert lmx_raw.interval == pytest.approx((0.9, 1.1))
    assert point.verdict == "undecided"
    assert point.series["aa"].n == 0  # these runs had no A/A pairs
    row = next(line for line in pool.to_markdown().splitlines() if line.startswith("| 8 |"))
    assert "| 6 | 1.00 [0.90–1.10] |" in row and "| A/A" not in row


def test_runs_of_other_workloads_do_not_pool() -> None:
    with pytest.raises(ValueError, match=r"b\.json ran preset 'other', a\.json 'tiny'"):
        Pool.of([("a.json", _report([1.0])), ("b.json", _report([1.0], preset="other"))])
    with pytest.raises(ValueError, match="prompt_tokens=128"):
        Pool.of([("a.json", _report([1.0])), ("b.json", _report([1.0], tokens=128))])
    tuned = _report([1.0])
    tuned.settings["glibc_tunables"] = {"raw": "", "workers": "glibc.malloc.hugetlb=1"}
    with pytest.raises(ValueError, match=r"b\.json ran glibc_tunables=\{'raw'"):
        Pool.of([("a.json", _report([1.0])), ("b.json", tuned)])


def test_the_saved_gpu_runs_pool_as_bench_readme_says(tmp_path: Path) -> None:
    names = [
        "throughput-qwen3-0.6b-h200-aa.json.gz",
        "throughput-qwen3-0.6b-h100-pinned.json.gz",
        "throughput-qwen3-0.6b-h100-pinned-c1.json.gz",
    ]
    pool_main([str(tmp_path / "pooled"), *(str(RESULTS / n) for n in names)])
    data = read_json(tmp_path / "pooled.json.gz")
    by = {p["concurrency"]: p for p in data["points"]}
    assert [by[c]["lmx_raw"]["n"] for c in (1, 2, 4, 8, 16, 32)] == [14, 8, 8, 8, 8, 8]
    medians = [round(by[c]["lmx_raw"]["median"], 2) for c in (1, 2, 4, 8, 16, 32)]
    assert medians == [0.93, 0.94, 0.97, 0.95, 0.93, 1.0]
    assert {p["verdict"] for p in data["points"]} == {"undecided"}
    assert all(p["own"]["interval"][0] >= 0.95 for p in data["points"])
    assert (tmp_path / "pooled.md").read_text().startswith("# Pooled pairs")


def test_the_runs_with_each_side_stepping_on_a_core_of_its_own_pool_as_bench_readme_says(
    tmp_path: Path,
) -> None:
    names = [f"throughput-qwen3-0.6b-h200-stepcpu{s}.json.gz" for s in ("", "-long", "-c1", "-c16")]
    pool_main([str(tmp_path / "pooled"), *(str(RESULTS / n) for n in names)])
    data = read_json(tmp_path / "pooled.json.gz")
    by = {p["concurrency"]: p for p in data["points"]}
    assert [by[c]["lmx_raw"]["n"] for c in (1, 16, 32)] == [42, 38, 40]
    assert [round(by[c]["lmx_raw"]["median"], 2) for c in (1, 16, 32)] == [0.94, 0.95, 0.91]
    assert by[1]["steps"]["interval"][1] < 1  # lmx's decode steps are the slower at 1 stream
    assert all(by[c]["steps"]["interval"][0] < 1 < by[c]["steps"]["interval"][1] for c in (16, 32))
    assert all(p["own"]["interval"][0] >= 0.95 for p in data["points"])


def test_the_runs_of_e1a1f74_pool_as_bench_readme_says(tmp_path: Path) -> None:
    names = [f"throughput-qwen3-0.6b-h200-e1a1f74-{i}.json.gz" for i in range(1, 7)]
    pool_main([str(tmp_path / "pooled"), *(str(RESULTS / n) for n in names)])
    data = read_json(tmp_path / "pooled.json.gz")
    by = {p["concurrency"]: p for p in data["points"]}
    assert [by[c]["lmx_raw"]["n"] for c in (1, 16, 32)] == [105, 105, 105]
    assert [round(by[c]["lmx_raw"]["median"], 2) for c in (1, 16, 32)] == [0.93, 0.93, 0.93]
    assert [round(by[c]["lmx_raw"]["interval"][1], 2) for c in (1, 16, 32)] == [1.0, 0.97, 0.98]
    assert [round(by[c]["own"]["median"], 3) for c in (1, 16, 32)] == [0.989, 0.975, 0.959]
    assert [by[c]["decode"]["below_1"] for c in (1, 16, 32)] == [62, 65, 59]
    assert [round(by[c]["decode"]["sign_p"], 2) for c in (1, 16, 32)] == [0.08, 0.02, 0.24]
    assert {p["verdict"] for p in data["points"]} == {"undecided"}


def test_the_command_names_what_does_not_pool(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(_report([1.0]).to_json()))
    b.write_text(json.dumps(_report([1.0], tokens=128).to_json()))
    with pytest.raises(SystemExit):
        pool_main([str(tmp_path / "out"), str(a), str(b)])
    assert "b.json ran prompt_tokens=128, a.json prompt_tokens=64" in capsys.readouterr().err
    assert not (tmp_path / "out.json.gz").exists()


def test_the_command_names_a_file_that_is_not_a_result(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "notes.json"
    bad.write_text('{"points": []}')
    for path in (bad, tmp_path / "missing.json"):
        with pytest.raises(SystemExit):
            pool_main([str(tmp_path / "out"), str(path)])
        assert f"{path}: not a throughput result" in capsys.readouterr().err
    assert not (tmp_path / "out.json.gz").exists()
