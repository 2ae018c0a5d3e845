"""bench.load_ab on the real tiny model: each load runs during its own mode's blocks only, a
serve load streams from lmx's app, and no load process outlives the run."""

from __future__ import annotations

import os
import time
from pathlib import Path

import psutil
import pytest
from mlx_lm import load as mlx_load

from bench.cpus import core_of
from bench.load_ab import LoadedSide, main, start_load
from bench.report import read_json
from tests.conftest import wait_for

ROUNDS = 6  # the fewest rounds whose median has a 95% interval


def test_a_load_runs_between_before_and_after_only(tiny_model_dir: Path) -> None:
    model = mlx_load(str(tiny_model_dir))[0]
    cpu = min(os.sched_getaffinity(0))
    side = LoadedSide(model, 8, start_load("spin", 1, [cpu], step_ms=2.0, streams=1))
    try:
        (proc,) = (psutil.Process(p.pid) for p in side.procs)
        wait_for(proc.status, lambda status: status == psutil.STATUS_STOPPED, 5)
        stopped = side._cpu_s()
        time.sleep(0.3)
        assert side._cpu_s() - stopped < 0.02
        side.before()
        assert proc.status() != psutil.STATUS_STOPPED
        time.sleep(0.3)
        side.after()
        assert side.busy[-1] > 0.2  # a busy loop on its CPU (shared with the other tests)
        wait_for(proc.status, lambda status: status == psutil.STATUS_STOPPED, 5)
    finally:
        side.close()
    assert not psutil.pid_exists(proc.pid) or proc.status() == psutil.STATUS_ZOMBIE


def test_alternates_raw_with_loads_and_reports_what_they_kept_busy(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    modes = ("raw", "spin1", "serve1")
    cpus = sorted(os.sched_getaffinity(0))
    # raw's loop on a CPU of its own where another core is left for the loads
    step = cpus[-1]
    others = [c for c in cpus if c not in core_of(step)]
    pinned = ["--step-cpu", str(step)] if others else []
    # the session's shared daemon, where an earlier test started it, outlives this run
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    main(
        [
            *("--model", str(tiny_model_dir), "--concurrency", "2", "--requests", "1"),
            *("--modes", ",".join(modes), "--seconds", "120", "--max-rounds", str(ROUNDS)),
            *("--step-ms", "2", "--serve-streams", "2", "--device-label", "here"),
            *("--out", str(tmp_path), *pinned),
        ]
    )
    assert sorted(os.sched_getaffinity(0)) == cpus  # this process's threads unpinned again
    data = read_json(tmp_path / f"load-ab-{tiny_model_dir.name}-here.json.gz")
    assert data["settings"]["load_cpus"] == (others if others else cpus)
    (point,) = data["points"]
    assert list(point["blocks"]) == list(modes)
    assert all(len(rows) == ROUNDS for rows in point["blocks"].values())
    assert set(point["pairs"]) == {"raw/spin1", "raw/serve1", "spin1/serve1"}
    busy = data["busy"]
    assert set(busy) == {"spin1", "serve1"}
    assert all(len(b) == ROUNDS + 1 for b in busy.values())  # the warm-up block too
    assert min(busy["spin1"]) > 0.2
    assert min(busy["serve1"]) > 0.01  # the free engine and its client streamed meanwhile
    # and nothing else: the client's start (its imports, a CPU second) was over before
    assert max(busy["serve1"]) < 0.6
    markdown = (tmp_path / f"load-ab-{tiny_model_dir.name}-here.md").read_text()
    assert "# raw's loop beside loads in one process —" in markdown
    assert "| serve1 | " in markdown and "| CPUs busy during its blocks |" in markdown
    left = {p.pid for p in psutil.Process().children(recursive=True)} - before
    assert not left  # every load ended with the run


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--modes", "raw,spin0"], "--modes: unknown spin0; known: raw, again,"),
        (["--modes", "raw,heat2"], "spinN, memN, serveN (N processes, N >= 1)"),
        (["--modes", "raw"], "--modes: name two or more"),
        (["--step-ms", "0"], "--step-ms: 0.0 is not above 0"),
        (["--serve-streams", "0"], "--serve-streams: 0 is below 1"),
        (["--step-cpu", "100000"], "--step-cpu: 100000 is not among this process's CPUs"),
    ],
)
def test_names_what_is_wrong_with_its_arguments(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        main(args)
    assert message in capsys.readouterr().err
