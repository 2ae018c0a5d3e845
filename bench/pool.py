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
import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from bench.report import (
    TARGET_RATIO,
    Point,
    Report,
    pyplot,
    read_json,
    stem_of,
    write_result,
)

CONFIDENCE = 0.95
_R = TypeVar("_R")
# The settings whose differences make two runs' pairs measure different things.
_SAME = ("prompt_tokens", "output_tokens", "max_batch", "dtype", "glibc_tunables")
# A median's standard error over a mean's, for normal data: how much wider its interval is.
_MEDIAN_EFFICIENCY = math.sqrt(math.pi / 2)


def median_interval(values: Sequence[float], confidence: float = CONFIDENCE) -> tuple[float, float]:
    """The narrowest interval of order statistics (the k-th lowest and k-th highest value) that
    holds the median of the values' distribution with at least `confidence`, for any
    distribution. Raises ValueError when too few values for one (under 6 at 95%)."""
    xs = sorted(values)
    n = len(xs)
    k = 0
    below = 0  # 2^n P(Binomial(n, 1/2) <= k): the chance that at most k values fall below it
    while k < n // 2:
        below += math.comb(n, k)
        if 1 - 2 * below / 2**n < confidence:
            break
        k += 1
    if k == 0:
        raise ValueError(f"{n} values give no {confidence:.0%} interval for a median")
    return xs[k - 1], xs[n - k]


@dataclass(frozen=True)
class Pooled:
    """One ratio's pairs at one concurrency, from every run pooled."""

    values: tuple[float, ...]

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def median(self) -> float:
        return statistics.median(self.values) if self.values else math.nan

    @property
    def geomean(self) -> float:
        return statistics.geometric_mean(self.values) if self.values else math.nan

    @property
    def below_1(self) -> int:
        return sum(v < 1 for v in self.values)

    @property
    def sign_p(self) -> float:
        """Two-sided sign test: the chance of pairs at least this lopsided about 1 if each pair
        were as likely below 1 as above (pairs of exactly 1 left out); nan without pairs."""
        below, above = self.below_1, sum(v > 1 for v in self.values)
        n = below + above
        if not n:
            return math.nan
        tail = sum(math.comb(n, i) for i in range(min(below, above) + 1))
        return min(1.0, 2 * tail / (1 << n))

    @property
    def interval(self) -> tuple[float, float] | None:
        try:
            return median_interval(self.values)
        except ValueError:
            return None

    @property
    def log_sd(self) -> float:
        """The spread of single pairs: the standard deviation of their logarithms."""
        if self.n < 2:
            return math.nan
        return statistics.stdev(math.log(v) for v in self.values)

    def verdict(self, target: float) -> str:
        iv = self.interval
        if iv is None:
            return "too few pairs"
        if iv[0] >= target:
            return "met"
        if iv[1] < target:
            return "not met"
        return "undecided"

    def pairs_for(self, within: float = 0.03) -> int | None:
        """About how many pairs would narrow the interval to ±`within` around the median at this
        spread (normal approximation); None without a spread."""
        if math.isnan(self.log_sd):
            return None
        z = statistics.NormalDist().inv_cdf(0.5 + CONFIDENCE / 2)
        return math.ceil((z * _MEDIAN_EFFICIENCY * self.log_sd / math.log1p(within)) ** 2)

    def to_json(self) -> dict[str, Any]:
        return {
            "n": self.n,
            "median": self.median,
            "interval": self.interval,
            "geomean": self.geomean,
            "below_1": self.below_1,
            "sign_p": self.sign_p,
            "log_sd": self.log_sd,
            "values": list(self.values),
        }


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
    series: dict[str, Pooled]

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
        first_name, first = runs[0]
        for name, r in runs[1:]:
            if r.preset != first.preset:
                raise ValueError(
                    f"{name} ran preset {r.preset!r}, {first_name} {first.preset!r}: not poolable"
                )
            for key in _SAME:
                if r.settings.get(key) != first.settings.get(key):
                    raise ValueError(
                        f"{name} ran {key}={r.settings.get(key)!r}, {first_name} "
                        f"{key}={first.settings.get(key)!r}: not poolable"
                    )
        concurrencies = sorted({p.concurrency for _, r in runs for p in r.points})
        points = tuple(
            PooledPoint(c, {key: Pooled(_pairs(runs, c, f)) for key, _, f in _SERIES})
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


def _pairs(
    runs: Sequence[tuple[str, Report]], concurrency: int, of: Callable[[Point], list[float]]
) -> tuple[float, ...]:
    return tuple(
        v for _, r in runs for p in r.points if p.concurrency == concurrency for v in of(p)
    )


def cell(s: Pooled, digits: int = 2) -> str:
    """`s`'s median and its interval, as the tables show them."""
    if not s.n:
        return "—"
    iv = s.interval
    span = f" [{iv[0]:.{digits}f}–{iv[1]:.{digits}f}]" if iv else " [too few]"
    return f"{s.median:.{digits}f}{span}"


def read_results(
    parser: argparse.ArgumentParser,
    files: Sequence[Path],
    kind: str,
    parse: Callable[[str, Any], _R],
) -> list[_R]:
    """Each file's JSON parsed (with its name); a file that is not `kind` ends the command,
    naming it and what is wrong."""
    results = []
    for f in files:
        try:
            results.append(parse(f.name, read_json(f)))
        except (OSError, ValueError, KeyError, TypeError) as e:  # JSONDecodeError is a ValueError
            parser.error(f"{f}: not {kind} ({type(e).__name__}: {e})")
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Pool the pairs of several throughput runs.")
    parser.add_argument("out", type=Path, help="output stem, e.g. bench/results/pooled-NAME")
    parser.add_argument("files", nargs="+", type=Path, help="throughput-*.json.gz of one workload")
    args = parser.parse_args(argv)
    runs = read_results(
        parser, args.files, "a throughput result", lambda name, data: (name, Report.from_json(data))
    )
    try:
        pool = Pool.of(runs)
    except ValueError as e:
        parser.error(str(e))
    for written in pool.write(args.out):
        print(f"wrote {written}")


if __name__ == "__main__":
    main()
