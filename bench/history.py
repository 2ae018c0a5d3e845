"""One workload's lmx/raw across builds and hosts, in the order they ran: where the target stands
and how it moved, in one table and one plot instead of a page of runs.

Each file given is one entry: a throughput run (throughput-*.json.gz), or a pool of runs
(pooled-*.json.gz, bench.pool's; its runs are read again from the files it names beside it).
Per entry and concurrency, for lmx/raw and for lmx's own time (lmx/raw had lmx's steps taken
raw's time): the median of the entry's pairs with its distribution-free 95% interval, and the
verdict against the target, as bench.pool gives them.

    python -m bench.history bench/results/history-NAME FILE.json.gz [FILE.json.gz ...]

writes history-NAME.json.gz, history-NAME.md and (with matplotlib) history-NAME.png.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.pairs import CONFIDENCE, Pairs, cell
from bench.pool import WORKLOAD, Pool, check_alike, read_results
from bench.report import TARGET_RATIO, Report, pyplot, read_json, stem_of, write_result

# What each entry shows per concurrency: (key in a pooled point's series, label, digits).
_SHOWN = (("lmx_raw", "lmx/raw", 2), ("own", "lmx's own time", 3))


@dataclass(frozen=True)
class Entry:
    file: str  # the result file it was read from
    pool: Pool

    @property
    def label(self) -> str:
        """The file's stem without its kind and preset: `h100-4eaede7` for
        pooled-qwen3-0.6b-h100-4eaede7.json.gz."""
        stem = stem_of(Path(self.file))
        for kind in ("pooled-", "throughput-"):
            stem = stem.removeprefix(kind)
        return stem.removeprefix(f"{self.preset}-")

    @property
    def preset(self) -> str:
        return self.pool.runs[0][1].preset

    @property
    def started_at(self) -> str:
        """When its first run began (`2026-12-07 14:02 UTC`: sorts as time does)."""
        return min(r.started_at for _, r in self.pool.runs)

    @property
    def last_started_at(self) -> str:
        return max(r.started_at for _, r in self.pool.runs)

    def series(self, key: str) -> dict[int, Pairs]:
        """Its pairs of `key` by concurrency."""
        return {p.concurrency: p.series[key] for p in self.pool.points}


def read_entry(path: Path, data: Any) -> Entry:
    """The entry of the result file at `path`, whose JSON is `data`. Raises OSError for a run a
    pool names that is not beside it, ValueError (KeyError, TypeError) for what is no result."""
    if "runs" in data:  # a pool: the runs it names
        names = [run["file"] for run in data["runs"]]
        runs = [(n, Report.from_json(read_json(path.parent / n))) for n in names]
    else:
        runs = [(path.name, Report.from_json(data))]
    return Entry(path.name, Pool.of(runs))


@dataclass(frozen=True)
class History:
    entries: tuple[Entry, ...]  # in the order they ran

    @classmethod
    def of(cls, entries: Sequence[Entry]) -> History:
        """`entries` in the order they ran. Raises ValueError for entries of other workloads
        (preset, prompt and output tokens, batch, dtype)."""
        if not entries:
            raise ValueError("no entries")
        check_alike([run for e in entries for run in e.pool.runs], WORKLOAD, "another workload")
        # Of two pools that began with the same run, the one that ended first ran first.
        return cls(tuple(sorted(entries, key=lambda e: (e.started_at, e.last_started_at))))

    @property
    def concurrencies(self) -> list[int]:
        return sorted({p.concurrency for e in self.entries for p in e.pool.points})

    def to_json(self) -> dict[str, Any]:
        return {
            "preset": self.entries[0].preset,
            "target_ratio": TARGET_RATIO,
            "confidence": CONFIDENCE,
            "entries": [
                {
                    "label": e.label,
                    "file": e.file,
                    "started_at": e.started_at,
                    "runs": [name for name, _ in e.pool.runs],
                    "points": [
                        {
                            "concurrency": p.concurrency,
                            "verdict": p.verdict,
                            **{
                                key: {
                                    "n": p.series[key].n,
                                    "median": p.series[key].median,
                                    "interval": p.series[key].interval,
                                }
                                for key, _, _ in _SHOWN
                            },
                        }
                        for p in e.pool.points
                    ],
                }
                for e in self.entries
            ],
        }

    def to_markdown(self) -> str:
        cs = self.concurrencies
        lines = [
            f"# lmx/raw across builds and hosts — `{self.entries[0].preset}`",
            "",
            "Each row one result file (`python -m bench.history`, see its docstring), in the order "
            f"they ran. Per concurrency, the median of its pairs with its distribution-free "
            f"{CONFIDENCE:.0%} interval and, in parentheses, how many pairs: **bold** where the "
            f"interval lies at or above the target {TARGET_RATIO} (met), _italic_ where it lies "
            "below (not met); plain where it holds the target (undecided) or there are too few "
            "pairs for an interval. Columns: concurrent streams.",
        ]
        for key, label, digits in _SHOWN:
            lines += [
                "",
                f"{label}:",
                "",
                "| ran | entry | runs | " + " | ".join(map(str, cs)) + " |",
                "|---|---|---:|" + "---:|" * len(cs),
            ]
            for e in self.entries:
                by = e.series(key)
                cells = [_cell(by[c], digits) if c in by else "" for c in cs]
                link = f"[{e.label}]({stem_of(Path(e.file))}.md)"
                row = [e.started_at, link, str(len(e.pool.runs)), *cells]
                lines.append("| " + " | ".join(row) + " |")
        return "\n".join(lines) + "\n"

    def write(self, stem: Path) -> list[Path]:
        """`stem`.json.gz, .md and (with matplotlib) .png."""
        return write_result(stem, self.to_json(), self.to_markdown(), {"": self._plot})

    def _plot(self, path: Path) -> bool:
        plt = pyplot()
        if plt is None:
            return False
        cs = self.concurrencies
        fig, axes = plt.subplots(
            len(_SHOWN), 1, sharex=True, figsize=(max(8.0, 0.6 * len(self.entries) + 3), 7.5)
        )
        for ax, (key, label, _) in zip(axes, _SHOWN, strict=True):
            for j, c in enumerate(cs):
                offset = (j - (len(cs) - 1) / 2) * 0.7 / len(cs)  # side by side in an entry
                drawn = False
                for i, e in enumerate(self.entries):
                    s = e.series(key).get(c)
                    if s is None or not s.n:
                        continue
                    iv = s.interval
                    ax.errorbar(
                        [i + offset],
                        [s.median],
                        # Without an interval (too few pairs) a hollow marker, no bar.
                        yerr=None if iv is None else [[s.median - iv[0]], [iv[1] - s.median]],
                        fmt="o",
                        ms=4,
                        color=f"C{j}",
                        mfc=f"C{j}" if iv else "none",
                        capsize=2,
                        ls="none",
                        label=None if drawn else f"{c} stream{'s' if c > 1 else ''}",
                    )
                    drawn = True
            ax.axhline(TARGET_RATIO, color="C3", ls="--", lw=1)
            ax.axhline(1.0, color="k", lw=0.6, alpha=0.5)
            ax.set_ylabel(f"{label}: median, {CONFIDENCE:.0%} interval")
            ax.grid(True, axis="y", alpha=0.3)
        # Intervals of a few pairs span ±50%: they would squeeze the rest into a line.
        axes[0].set_ylim(0.7, 1.3)
        axes[-1].set_xticks(range(len(self.entries)), [e.label for e in self.entries])
        plt.setp(axes[-1].get_xticklabels(), rotation=45, ha="right")
        axes[0].set_title(
            f"{self.entries[0].preset}: lmx/raw by build and host, target {TARGET_RATIO} (dashed); "
            "hollow: too few pairs"
        )
        axes[0].legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize="small")
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return True


def _cell(s: Pairs, digits: int) -> str:
    if not s.n:  # runs without step records have no own time
        return "—"
    text = f"{cell(s, digits)} ({s.n})"
    verdict = s.verdict(TARGET_RATIO)
    return f"**{text}**" if verdict == "met" else f"_{text}_" if verdict == "not met" else text


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="One workload's lmx/raw across builds and hosts.")
    parser.add_argument("out", type=Path, help="output stem, e.g. bench/results/history-NAME")
    parser.add_argument(
        "files", nargs="+", type=Path, help="throughput-*.json.gz or pooled-*.json.gz"
    )
    args = parser.parse_args(argv)
    entries = read_results(parser, args.files, "a throughput run or pool", read_entry)
    try:
        history = History.of(entries)
    except ValueError as e:
        parser.error(str(e))
    for written in history.write(args.out):
        print(f"wrote {written}")


if __name__ == "__main__":
    main()
