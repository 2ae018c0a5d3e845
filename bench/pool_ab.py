"""Pools the rounds of several bench.worker_ab runs: per concurrency and pair of modes, every
round of every run that ran both modes there, as bench.pool pools the pairs of throughput runs;
and every draw's median of its rounds (a run from before `--draws` was one draw): with `--processes`
a draw's rounds share their processes' layout in memory, so draws are what tell modes apart.

A run's round is a ratio of two blocks run back to back on one machine, whatever its level at the
time, so rounds of runs on different leases pool; runs with different workloads, or one in one
process and one with `--processes`, measure different things and are refused.

    python -m bench.pool_ab bench/results/pooled-worker-ab-NAME RUN.json.gz [RUN.json.gz ...]

writes pooled-worker-ab-NAME.json.gz and .md.
"""

from __future__ import annotations

import argparse
import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.pairs import Pairs
from bench.pool import read_results
from bench.report import write_result
from bench.worker_ab import MEASURES, PROCESS_MODES, Point, pair_cell

# The settings whose differences make two runs' rounds measure different things.
_SAME = ("requests", "prompt_tokens", "output_tokens", "processes", "glibc_tunables")


@dataclass(frozen=True)
class Run:
    name: str
    model: str
    device: str
    started_at: str
    settings: dict[str, Any]
    points: list[Point]

    @classmethod
    def from_json(cls, name: str, data: dict[str, Any]) -> Run:
        points = [Point.from_json(p) for p in data["points"]]
        return cls(
            name, data["model"], data["device"], data["started_at"], data["settings"], points
        )


@dataclass(frozen=True)
class PooledPair:
    runs: int
    measures: tuple[Pairs, ...]  # per MEASURES
    draws: Pairs  # each draw's median of its rounds' decode steps (wall)


def pool(runs: Sequence[Run]) -> dict[int, dict[tuple[str, str], PooledPair]]:
    """Per concurrency, per pair of modes (in PROCESS_MODES' order) that some run ran together
    there, the rounds of all such runs. Raises ValueError when the runs' model or workload differ."""
    first = runs[0]
    for r in runs[1:]:
        if r.model != first.model:
            raise ValueError(f"{r.name}: model {r.model}, not {first.model} as {first.name}")
        for key in _SAME:
            if r.settings.get(key) != first.settings.get(key):
                raise ValueError(
                    f"{r.name}: {key} {r.settings.get(key)!r}, not {first.settings.get(key)!r} "
                    f"as {first.name}"
                )
    pooled: dict[int, dict[tuple[str, str], PooledPair]] = {}
    for c in sorted({p.concurrency for r in runs for p in r.points}):
        here = [p for r in runs for p in r.points if p.concurrency == c]
        pairs = {}
        for a, b in itertools.combinations(PROCESS_MODES, 2):
            with_both = [p for p in here if a in p.blocks and b in p.blocks]
            if with_both:
                pairs[a, b] = PooledPair(
                    len(with_both),
                    tuple(
                        Pairs(tuple(v for p in with_both for v in p.pooled(a, b, i).values))
                        for i in range(len(MEASURES))
                    ),
                    Pairs(tuple(v for p in with_both for v in p.by_draw(a, b, 0).values)),
                )
        pooled[c] = pairs
    return pooled


def to_markdown(runs: Sequence[Run], pooled: dict[int, dict[tuple[str, str], PooledPair]]) -> str:
    s = runs[0].settings
    where = "each mode in a process of its own" if s.get("processes") else "in one process"
    lines = [
        f"# bench.worker_ab pooled: {len(runs)} runs of `{runs[0].model}`, {where}",
        "",
        f"{s['requests']} requests per stream per block, {s['prompt_tokens']} prompt and "
        f"{s['output_tokens']} output tokens, greedy, EOS ignored. Runs:",
        "",
        *(
            f"- {r.name}: `{r.device}`, {r.started_at}, modes {', '.join(r.settings['modes'])}; "
            + ", ".join(
                f"{len(next(iter(p.blocks.values())))} rounds at {p.concurrency}" for p in r.points
            )
            for r in runs
        ),
        "",
        "Per pair of modes, a's measure over b's per round, the rounds of every run that ran both "
        "(below 1: b took longer; for whole blocks, b's throughput over a's): median "
        "[distribution-free 95% interval], geometric mean, rounds below 1, sign test; and so "
        "each draw's median decode step ratio (wall).",
    ]
    for c, pairs in pooled.items():
        lines += [
            "",
            f"## {c} stream{'s' if c > 1 else ''}",
            "",
            f"| a/b | runs | {' | '.join(col for _, col in MEASURES)} | per draw, decode step, wall |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for (a, b), pair in pairs.items():
            cells = " | ".join(pair_cell(m) for m in (*pair.measures, pair.draws))
            lines.append(f"| {a}/{b} | {pair.runs} | {cells} |")
    return "\n".join(lines) + "\n"


def to_json(runs: Sequence[Run], pooled: dict[int, dict[tuple[str, str], PooledPair]]) -> Any:
    return {
        "runs": [
            {"file": r.name, "device": r.device, "started_at": r.started_at, "settings": r.settings}
            for r in runs
        ],
        "points": [
            {
                "concurrency": c,
                "pairs": {
                    f"{a}/{b}": {
                        "runs": pair.runs,
                        "by_draw": pair.draws.to_json(),
                        **{
                            key: m.to_json()
                            for (key, _), m in zip(MEASURES, pair.measures, strict=True)
                        },
                    }
                    for (a, b), pair in pairs.items()
                },
            }
            for c, pairs in pooled.items()
        ],
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Pool the rounds of several bench.worker_ab runs.")
    parser.add_argument("out", type=Path, help="output stem, e.g. bench/results/pooled-worker-ab-X")
    parser.add_argument("files", nargs="+", type=Path, help="worker-ab-*.json.gz")
    args = parser.parse_args(argv)
    runs = read_results(
        parser,
        args.files,
        "a bench.worker_ab result",
        lambda path, data: Run.from_json(path.name, data),
    )
    try:
        pooled = pool(runs)
    except ValueError as e:
        parser.error(str(e))
    for written in write_result(args.out, to_json(runs, pooled), to_markdown(runs, pooled), {}):
        print(f"wrote {written}")


if __name__ == "__main__":
    main()
