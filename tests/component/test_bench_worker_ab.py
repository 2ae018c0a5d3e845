"""bench.worker_ab on the real tiny model: every mode runs its blocks to the end, in this process
or each in its own, and the pairs it reports are the rounds' ratios of what it measured."""

from __future__ import annotations

import json
import multiprocessing
import os
import platform
import shutil
import statistics
from pathlib import Path

import mlx.core as mx
import pytest
from mlx_lm import load as mlx_load

from bench import worker_ab
from bench.report import read_json
from bench.worker_ab import MODES, _PiledSide, main, measure
from lmx.runtime.mlx_engine import worker_tunables

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
    data = read_json(tmp_path / f"{stem}.json.gz")
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
    assert data["pids"] == [dict.fromkeys(MODES, os.getpid())] * 2  # a draw per concurrency
    markdown = (tmp_path / f"{stem}.md").read_text()
    assert "loop in one process —" in markdown
    assert "## 2 streams, 6 rounds" in markdown
    assert "| lumped/" not in markdown  # lumped is the last mode: only ever b of a pair
    assert "| piled/lumped |" in markdown
    assert "| mode | decode step ms, wall | CPU | whole block s |" in markdown


def test_with_processes_each_mode_steps_in_a_process_of_its_own(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    modes = ("raw", "again", "hosted", "thread", "tuned")
    main(
        [
            *("--model", str(tiny_model_dir), "--concurrency", "2", "--requests", "1"),
            *("--modes", ",".join(modes), "--processes", "--draws", "2", "--seconds", "120"),
            *("--max-rounds", str(ROUNDS // 2), "--device-label", "here", "--out", str(tmp_path)),
        ]
    )
    stem = f"worker-ab-{tiny_model_dir.name}-here"
    data = read_json(tmp_path / f"{stem}.json.gz")
    assert data["settings"]["processes"] is True
    assert data["settings"]["draws"] == 2
    first, second = data["pids"]  # each draw's processes are new ones
    assert list(first) == list(second) == list(modes)
    pids = {*first.values(), *second.values(), os.getpid()}
    assert len(pids) == 2 * len(modes) + 1
    (point,) = data["points"]
    assert all(len(point["blocks"][m]) == ROUNDS for m in modes)
    assert point["draws"] == [0] * (ROUNDS // 2) + [1] * (ROUNDS // 2)
    by_draw = point["pairs"]["raw/thread"]["by_draw"]["wall"]
    raw, thread = point["blocks"]["raw"], point["blocks"]["thread"]
    ratios = [r[0] / t[0] for r, t in zip(raw, thread, strict=True)]
    half = ROUNDS // 2
    assert by_draw["values"] == pytest.approx(
        [statistics.median(ratios[:half]), statistics.median(ratios[half:])]
    )
    assert all(32 * ms / 1e3 < s for m in modes for ms, _, s in point["blocks"][m])
    assert point["pairs"]["raw/again"]["wall"]["interval"] is not None
    markdown = (tmp_path / f"{stem}.md").read_text()
    assert "loop each in a process of its own —" in markdown
    assert "## 2 streams, 6 rounds in 2 draws" in markdown
    assert "| per draw, decode step, wall |" in markdown
    assert not multiprocessing.active_children()  # every side's process ended with the run
    if platform.libc_ver()[0] == "glibc":
        ours = worker_tunables({})
        assert data["settings"]["glibc_tunables"] == {
            **dict.fromkeys(("raw", "again", "hosted"), ""),
            **dict.fromkeys(("thread", "tuned"), ours),
        }
        defaults = "; ".join(f"{m} glibc's defaults" for m in ("raw", "again", "hosted"))
        assert f"{defaults}; thread `{ours}`; tuned `{ours}`." in markdown


def test_lmxs_modes_and_tuned_start_with_lmxs_workers_malloc_and_the_others_as_they_are(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.hugetlb=0")
    given = dict(os.environ)
    for mode in worker_ab.PROCESS_MODES:
        with worker_ab._environment(mode):
            tunables = os.environ["GLIBC_TUNABLES"]
        assert os.environ == given
        if mode in ("thread", "inline", "quiet", "nocache", "tuned"):
            assert tunables == worker_tunables(given)
            assert tunables.startswith("glibc.malloc.hugetlb=0:glibc.malloc.mmap_threshold=")
        else:
            assert tunables == "glibc.malloc.hugetlb=0"


def test_a_side_that_cannot_load_is_named_and_no_process_is_left(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, broken)
    for weights in broken.glob("*.safetensors"):
        weights.write_bytes(b"not safetensors")
    with pytest.raises(RuntimeError, match=r"^raw: "):
        measure(broken, concurrency=[1], seconds=1, modes=("raw", "thread"), processes=True)
    assert not multiprocessing.active_children()


def test_piled_keeps_each_requests_keys_and_values_within_the_budget_and_lumped_8_arrays(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = mlx_load(str(tiny_model_dir))[0]
    layers = json.loads((tiny_model_dir / "config.json").read_text())["num_hidden_layers"]
    prompts = [[[5] * 8, [6] * 8]]  # one stream, two requests of 8 tokens

    piled = _PiledSide(model, tiny_model_dir, 8, lumped=False)
    piled.block(prompts, 4)
    piled.after()
    assert [len(entry) for entry in piled._pile] == [2 * layers] * 2
    assert {a.shape[2] for entry in piled._pile for a in entry} == {12}  # 8 + 4 tokens each
    entry_bytes = sum(a.nbytes for a in piled._pile[0])
    monkeypatch.setattr(worker_ab, "_PILE_BYTES", 3 * entry_bytes)
    piled.block(prompts, 4)
    piled.after()
    assert len(piled._pile) == 3  # the oldest of four went

    lumped = _PiledSide(model, tiny_model_dir, 8, lumped=True)
    lumped.block(prompts, 4)
    lumped.after()
    (arrays,) = lumped._pile
    assert len(arrays) == 8 and sum(a.nbytes for a in arrays) == 3 * entry_bytes
    assert all(a.dtype == mx.bfloat16 for a in arrays)
    for side in (piled, lumped):
        side.close()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--modes", "raw,threads"],
            "--modes: unknown threads; known: raw, again, hosted, thread, inline, quiet, nocache, "
            "piled, lumped, tuned",
        ),
        (["--modes", "raw,tuned"], "--modes: tuned needs --processes"),
        (["--modes", "raw"], "--modes: name two or more"),
        (["--concurrency", "1,x"], "--concurrency: '1,x' is not a list of numbers such as 1,16"),
        (["--concurrency", "0"], "--concurrency: 0 is below 1"),
        (["--draws", "2"], "--draws: needs --processes"),
        (["--processes", "--draws", "0"], "--draws: 0 is below 1"),
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


def test_measure_in_one_process_refuses_tuned(
    tiny_model_dir: Path,
) -> None:
    with pytest.raises(ValueError, match="tuned: a mode only with processes"):
        measure(tiny_model_dir, concurrency=[1], seconds=1, modes=("raw", "tuned"))
