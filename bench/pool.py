"""Pools the pairs of several throughput runs per concurrency: what the runs say together of lmx/raw
against the target, and how many more pairs it would take to say it.

A run's point is the median of 3-8 pairs (lmx's run over raw's beside it), and on the lent GPU
machines single pairs spread by 9-17%: one run cannot tell a ratio of 0.95 from one of 1.00
(bench/README.md). The pairs of several runs with the same workload pool: a pair is a ratio of two
runs back to back, whatever the machine's level at the time. Per concurrency this writes:

- the median of all pairs with a distribution-free 95% interval: the median of the pairs'
  distribution lies between the k-th lowest and the k-th highest pair with at least 95%
  probability, whatever that distribution (order statistics; a slow spell that hits one side of a
  pair is an outlier it is not moved by), and no interval below 6 pairs;
- the geometric mean and the pairs below 1;
- the same for the A/A pairs (raw's second run over its first: their interval should hold 1, or
  the pairing is biased), for lmx's own time (lmx/raw had lmx's steps taken raw's time), for
  its steps' speed (raw's time in steps over lmx's) and for its decode steps alone (raw's mean
  decode step over lmx's), with a sign test of the last: does lmx decode slower or faster?
- the verdict: met where the interval lies at or above the target, not met where it lies below,
  else undecided; and about how many pairs would narrow the interval to ±3% at this spread.

    python -m bench.pool bench/results/pooled-NAME RUN.json.gz [RUN.json.gz ...]

writes pooled-NAME.json.gz, pooled-NAME.md and (with matplotlib) pooled-NAME.png.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from bench.pairs import CONFIDENCE, Pairs, cell
from bench.report import (
    TARGET_RATIO,
    Point,
    Report,
    pyplot,
    read_json,
    stem_of,
    write_result,
)

_R = TypeVar("_R")
# The settings that make a workload: runs that differ in one measured different things.
WORKLOAD = ("prompt_tokens", "output_tokens", "max_batch", "dtype")
# And those whose differences make two runs' pairs measure different things.
_SAME = (*WORKLOAD, "glibc_tunables")


# What is pooled, per point of a run: (key, label, the pairs).
_SERIES: tuple[tuple[str, str, Callable[[Point], list[float]]], ...] = (
    ("lmx_raw", "lmx/raw", lambda p: p.pair_ratios),
    ("aa", "A/A", lambda p: p.again_ratios),
    ("own", "lmx's own time", lambda p: p.own_ratios),
    ("steps", "its steps' speed", lambda p: p.step_ratios),
    ("decode", "its decode steps' speed", lambda p: p.decode_ratios),
    ("decode_cpu", "its decode steps' CPU time", lambda p: p.decode_cpu_ratios),
)


@dataclass(frozen=True)
class PooledPoint:
    concurrency: int
    series: dict[str, Pairs]

    @property
    def verdict(self) -> str:
        return self.series["lmx_raw"].verdict(TARGET_RATIO)


@dataclass(frozen=True)
class Pool:
    runs: tuple[tuple[str, Report], ...]  # (file name, its report)
    points: tuple[PooledPoint, ...]

    @classmethod
    def of(cls, runs: Sequence[tuple[str, Report]]) -> Pool:
        """The pairs of `runs` pooled per concurrency. Raises ValueError for runs that measured
        different workloads (preset, prompt and output tokens, batch, dtype)."""
        if not runs:
            raise ValueError("no runs to pool")
        check_alike(runs, _SAME, "not poolable")
        concurrencies = sorted({p.concurrency for _, r in runs for p in r.points})
        points = tuple(
            PooledPoint(c, {key: Pairs(_pairs(runs, c, f)) for key, _, f in _SERIES})
            for c in concurrencies
        )
        return cls(tuple(runs), points)

    def to_json(self) -> dict[str, Any]:
        return {
            "target_ratio": TARGET_RATIO,
            "confidence": CONFIDENCE,
            "runs": [
                {
                    "file": name,
                    "preset": r.preset,
                    "device": r.device,
                    "started_at": r.started_at,
                    "settings": r.settings,
                }
                for name, r in self.runs
            ],
            "points": [
                {
                    "concurrency": p.concurrency,
                    "verdict": p.verdict,
                    "pairs_for_3pct": p.series["lmx_raw"].pairs_for(0.03),
                    **{key: p.series[key].to_json() for key, _, _ in _SERIES},
                }
                for p in self.points
            ],
        }

    def to_markdown(self) -> str:
        preset = self.runs[0][1].preset
        lines = [
            f"# Pooled pairs: lmx over HTTP vs raw BatchGenerator — `{preset}`",
            "",
            "The pairs of these runs (`python -m bench.pool`, see its docstring):",
            "",
            *[
                f"- [{name}]({stem_of(Path(name))}.md): {r.device}, {r.started_at}, "
                f"{r.settings.get('repeats', '?')} repeats"
                for name, r in self.runs
            ],
            "",
            f"Per concurrency, over all pairs: the median with its distribution-free "
            f"{CONFIDENCE:.0%} interval [k-th lowest pair, k-th highest], the geometric mean, the "
            "pairs below 1 and the spread of single pairs (standard deviation of their logarithm). "
            f"Verdict against the target {TARGET_RATIO}: met where the interval lies at or above "
            "it, not met where below, else undecided; then about how many pairs would narrow the "
            "interval to ±3% at this spread.",
            "",
            "| streams | pairs | lmx/raw median [interval] | geomean | below 1 | spread "
            "| A/A median [interval] | lmx's own time median [interval] "
            "| its steps' speed median [interval] | its decode steps' speed: median [interval], "
            "below 1, sign test | their CPU time: the same | verdict | pairs for ±3% |",
            "|---:" * 11 + "|---|---:|",
        ]
        for p in self.points:
            x, aa, own, st = (p.series[k] for k in ("lmx_raw", "aa", "own", "steps"))
            need = x.pairs_for(0.03)
            decode, cpu = (
                f"{cell(s, 3)}, {s.below_1} of {s.n}, p = {s.sign_p:.2g}" if s.n else "—"
                for s in (p.series["decode"], p.series["decode_cpu"])
            )
            lines.append(
                f"| {p.concurrency} | {x.n} | {cell(x)} | {x.geomean:.3f} "
                f"| {x.below_1} of {x.n} | {x.log_sd:.1%} | {cell(aa)} | {cell(own, 3)} "
                f"| {cell(st, 3)} | {decode} | {cpu} | {p.verdict} "
                f"| {'—' if need is None else need} |"
            )
        met = sum(p.verdict == "met" for p in self.points)
        own_met = sum(p.series["own"].verdict(TARGET_RATIO) == "met" for p in self.points)
        lines += [
            "",
            f"Target lmx/raw ≥ {TARGET_RATIO} at every concurrency: met at {met} of "
            f"{len(self.points)} points at {CONFIDENCE:.0%} confidence. lmx's own time alone "
            f"(lmx/raw had lmx's steps taken raw's time) is at or above it at {own_met} of "
            f"{len(self.points)}.",
        ]
        return "\n".join(lines) + "\n"

    def write(self, stem: Path) -> list[Path]:
        """`stem`.json.gz, .md and (with matplotlib) .png."""
        return write_result(stem, self.to_json(), self.to_markdown(), {"": self._plot})

    def _plot(self, path: Path) -> bool:
        plt = pyplot()
        if plt is None:
            return False
        fig, ax = plt.subplots(figsize=(8.5, 4.2))
        xs = [p.concurrency for p in self.points]
        shown = (("lmx_raw", "d", "C2"), ("aa", "x", "C7"), ("own", "o", "C0"))
        for i, (key, marker, color) in enumerate(shown):
            label = next(lab for k, lab, _ in _SERIES if k == key)
            offset = 2 ** ((i - 1) * 0.08)  # side by side on the log axis
            for p in self.points:
                s = p.series[key]
                if not s.n:
                    continue
                iv = s.interval or (min(s.values), max(s.values))
                ax.errorbar(
                    [p.concurrency * offset],
                    [s.median],
                    yerr=[[s.median - iv[0]], [iv[1] - s.median]],
                    fmt=marker,
                    color=color,
                    capsize=3,
                    ls="none",
                    label=label if p is self.points[0] else None,
                )
        ax.axhline(TARGET_RATIO, color="C3", ls="--", label=f"target {TARGET_RATIO}")
        ax.axhline(1.0, color="k", lw=0.6, alpha=0.5)
        ax.set_xscale("log", base=2)
        ax.set_xticks(xs, [str(x) for x in xs])
        ax.set_xlabel("concurrent streams")
        ax.set_ylabel(f"median of pooled pairs, {CONFIDENCE:.0%} interval")
        ax.set_title(f"{self.runs[0][1].preset}: {len(self.runs)} runs pooled")
        ax.grid(True, alpha=0.3)
        # Beside the axes: inside, it hid the lowest intervals.
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize="small")
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return True


def check_alike(runs: Sequence[tuple[str, Report]], keys: Sequence[str], unlike: str) -> None:
    """Raises ValueError naming the first of `runs` whose preset or a setting of `keys` is not the
    first run's, and ending with `unlike`."""
    first_name, first = runs[0]
    for name, r in runs[1:]:
        if r.preset != first.preset:
            raise ValueError(
                f"{name} ran preset {r.preset!r}, {first_name} {first.preset!r}: {unlike}"
            )
        for key in keys:
            if r.settings.get(key) != first.settings.get(key):
                raise ValueError(
                    f"{name} ran {key}={r.settings.get(key)!r}, {first_name} "
                    f"{key}={first.settings.get(key)!r}: {unlike}"
                )


def _pairs(
    runs: Sequence[tuple[str, Report]], concurrency: int, of: Callable[[Point], list[float]]
) -> tuple[float, ...]:
    return tuple(
        v for _, r in runs for p in r.points if p.concurrency == concurrency for v in of(p)
    )


def read_results(
    parser: argparse.ArgumentParser,
    files: Sequence[Path],
    kind: str,
    parse: Callable[[Path, Any], _R],
) -> list[_R]:
    """Each file's JSON parsed (with its path); a file that is not `kind` ends the command,
    naming it and what is wrong."""
    results = []
    for f in files:
        try:
            results.append(parse(f, read_json(f)))
        except (OSError, ValueError, KeyError, TypeError) as e:  # JSONDecodeError is a ValueError
            parser.error(f"{f}: not {kind} ({type(e).__name__}: {e})")
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Pool the pairs of several throughput runs.")
    parser.add_argument("out", type=Path, help="output stem, e.g. bench/results/pooled-NAME")
    parser.add_argument("files", nargs="+", type=Path, help="throughput-*.json.gz of one workload")
    args = parser.parse_args(argv)
    runs = read_results(
        parser,
        args.files,
        "a throughput result",
        lambda path, data: (path.name, Report.from_json(data)),
    )
    try:
        pool = Pool.of(runs)
    except ValueError as e:
        parser.error(str(e))
    for written in pool.write(args.out):
        print(f"wrote {written}")


if __name__ == "__main__":
    main()
