"""Writes a throughput run's results: JSON (everything, gzipped), Markdown (the table), PNG (the
plot).

Called by run_throughput once all points are measured. The PNG needs matplotlib; without it the
plot is skipped and the other two files are still written. `python -m bench.report
FILE.json.gz ...` renders saved results again with this version's tables and plots.
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from bench.metrics import PointStats
from bench.pairs import CONFIDENCE, Pairs, cell
from lmx.runtime.steptrace import Step
from lmx.units import fmt_bytes

TARGET_RATIO = 0.95


@dataclass(frozen=True)
class Point:
    concurrency: int
    raw: PointStats  # medians over the repeats
    lmx: PointStats
    raw_runs: tuple[PointStats, ...]
    lmx_runs: tuple[PointStats, ...]
    engine: PointStats | None = None  # lmx's engine without HTTP (--engine-layer)
    engine_runs: tuple[PointStats, ...] = ()
    steps: dict[str, tuple[Step, ...]] = field(default_factory=dict)  # by side, its last run
    # Raw once more in each repeat: the A/A test (--no-again leaves it out).
    again_runs: tuple[PointStats, ...] = ()

    @property
    def pair_ratios(self) -> list[float]:
        """lmx's tok/s over raw's, repeat by repeat: the two runs of a repeat are back to back,
        so a shared machine's slow spells, which last seconds, mostly hit both or neither."""
        return _pair_ratios(self.lmx_runs, self.raw_runs)

    @property
    def ratio(self) -> float:
        """The median of `pair_ratios`."""
        return _median(self.pair_ratios)

    @property
    def pairs(self) -> Pairs:
        """`pair_ratios` for their median's interval and the verdict."""
        return Pairs(tuple(self.pair_ratios))

    @property
    def verdict(self) -> str:
        """lmx/raw against the target at CONFIDENCE, from the interval of `pair_ratios`' median:
        met, not met, undecided or too few pairs (bench.pairs.Pairs.verdict)."""
        return self.pairs.verdict(TARGET_RATIO)

    @property
    def again_ratios(self) -> list[float]:
        """raw's second run over its first, repeat by repeat: the same pairing as `pair_ratios`
        with nothing to find, so what the machine alone makes of a pair."""
        return _pair_ratios(self.again_runs, self.raw_runs)

    @property
    def again_ratio(self) -> float:
        return _median(self.again_ratios)

    @property
    def engine_ratio(self) -> float:
        return _median(_pair_ratios(self.engine_runs, self.raw_runs))

    @property
    def own_ratios(self) -> list[float]:
        """lmx/raw had lmx's steps taken raw's time, repeat by repeat: what lmx's own time outside
        its batch steps (its work on each step's results, the waits for requests, HTTP at a
        run's start and end) leaves of raw's rate."""
        return [
            x.output_tokens / (x.wall_s - x.busy_s + r.busy_s) / (r.output_tokens / r.wall_s)
            for x, r in zip(self.lmx_runs, self.raw_runs, strict=False)
            if r.wall_s > 0 and x.busy_s > 0 and r.busy_s > 0
        ]

    @property
    def own_ratio(self) -> float:
        """The median of `own_ratios`."""
        return _median(self.own_ratios)

    @property
    def step_ratios(self) -> list[float]:
        """raw's time in batch steps over lmx's, repeat by repeat: how fast lmx's steps ran, the
        same steps of the same BatchGenerator, against raw's; with `own_ratios`, about
        `pair_ratios`."""
        return [
            r.busy_s / x.busy_s
            for x, r in zip(self.lmx_runs, self.raw_runs, strict=False)
            if x.busy_s > 0 and r.busy_s > 0
        ]

    @property
    def step_ratio(self) -> float:
        """The median of `step_ratios`."""
        return _median(self.step_ratios)

    @property
    def decode_ratios(self) -> list[float]:
        """raw's mean decode step (no prompt work) over lmx's, repeat by repeat: `step_ratios`
        without the prompt steps, whose share of a run differs between repeats."""
        return [
            r.decode_step_ms / x.decode_step_ms
            for x, r in zip(self.lmx_runs, self.raw_runs, strict=False)
            if x.decode_step_ms > 0 and r.decode_step_ms > 0
        ]

    @property
    def decode_cpu_ratios(self) -> list[float]:
        """raw's stepping thread's CPU time in a decode step over lmx's, repeat by repeat: where
        `decode_ratios` is below 1 and this is not, lmx's stepping thread waited in its steps (for
        the GIL, for a core); where this is too, its steps took more work of the CPU (a slower
        core, or one whose caches other processes share)."""
        return [
            r.decode_cpu_ms / x.decode_cpu_ms
            for x, r in zip(self.lmx_runs, self.raw_runs, strict=False)
            if x.decode_cpu_ms > 0 and r.decode_cpu_ms > 0
        ]

    @property
    def raw_spread(self) -> float:
        """raw's fastest run over its slowest: how much the machine alone moved the numbers."""
        rates = [r.output_tok_s for r in self.raw_runs if r.output_tok_s]
        return max(rates) / min(rates) if rates else math.nan


def _pair_ratios(runs: Sequence[PointStats], raw_runs: Sequence[PointStats]) -> list[float]:
    return [
        r.output_tok_s / b.output_tok_s
        for r, b in zip(runs, raw_runs, strict=False)
        if b.output_tok_s
    ]


def _ratio_cell(ratio: float, pairs: Sequence[float]) -> str:
    """The median in bold, marked when below the target, then its lowest and highest pair."""
    mark = "" if ratio >= TARGET_RATIO else " ✗"
    span = f" ({min(pairs):.2f}–{max(pairs):.2f})" if pairs else ""
    return f"**{ratio:.2f}**{mark}{span}"


def pyplot() -> Any:
    """matplotlib's pyplot drawing to files (the Agg backend), or None where it is not
    installed: the plots are optional, the tables are not."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def write_result(
    stem: Path, data: dict[str, Any], markdown: str, plots: Mapping[str, Callable[[Path], bool]]
) -> list[Path]:
    """`stem`.json.gz and `stem`.md, and `stem<suffix>`.png for each plot that draws (it returns
    False without matplotlib): the paths written. The JSON is gzipped: results are kept in the
    repository, and every call to the lent GPU machine carries the repository (bench/README)."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    paths = [stem.with_name(stem.name + ".json.gz"), stem.with_name(stem.name + ".md")]
    text = json.dumps(data, indent=2) + "\n"
    paths[0].write_bytes(gzip.compress(text.encode(), mtime=0))
    paths[1].write_text(markdown)
    for suffix, plot in plots.items():
        png = stem.with_name(f"{stem.name}{suffix}.png")
        if plot(png):
            paths.append(png)
    return paths


def stem_of(path: Path) -> str:
    """A result file's name without `.json` or `.json.gz`: its other files' stem."""
    return path.name.removesuffix(".gz").removesuffix(".json")


def read_json(path: Path) -> Any:
    """A result's JSON, gzipped (`.gz`, as write_result writes it) or not."""
    raw = path.read_bytes()
    return json.loads(gzip.decompress(raw) if path.suffix == ".gz" else raw)


def _median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else math.nan


def _prompt_cache_line(nbytes: int | None) -> list[str]:
    """The report's line on lmx's prompt cache where the run set its budget (none by default)."""
    if nbytes is None:
        return []
    if nbytes == 0:
        return ["lmx's prompt cache: off."]
    return [f"lmx's prompt cache: {fmt_bytes(nbytes)}."]


def _malloc_line(tunables: dict[str, str] | None) -> list[str]:
    """The report's line on glibc's malloc settings of each side, where the run recorded them."""
    if tunables is None:
        return []
    raw, workers = (
        f"`{tunables[k]}`" if tunables[k] else "glibc's defaults" for k in ("raw", "workers")
    )
    return [f"GLIBC_TUNABLES: raw's process {raw}; lmx's workers {workers}."]


@dataclass
class Report:
    preset: str
    device: str
    settings: dict[str, Any]
    versions: dict[str, str]
    started_at: str
    points: list[Point] = field(default_factory=list)
    duration_s: float = 0.0
    notes: list[str] = field(default_factory=list)

    @property
    def stem(self) -> str:
        return f"throughput-{self.preset}-{self.device}"

    def to_json(self) -> dict[str, Any]:
        return {
            "preset": self.preset,
            "device": self.device,
            "settings": self.settings,
            "versions": self.versions,
            "started_at": self.started_at,
            "duration_s": round(self.duration_s, 1),
            "target_ratio": TARGET_RATIO,
            "meets_target": all(p.verdict == "met" for p in self.points),
            "notes": self.notes,
            "points": [
                {
                    "concurrency": p.concurrency,
                    "ratio": p.ratio,
                    "verdict": p.verdict,
                    "pair_ratios": p.pair_ratios,
                    **(
                        {"own_ratio": p.own_ratio, "step_ratio": p.step_ratio}
                        if not math.isnan(p.own_ratio)  # runs without step records have none
                        else {}
                    ),
                    "raw": asdict(p.raw),
                    "lmx": asdict(p.lmx),
                    "raw_runs": [asdict(r) for r in p.raw_runs],
                    "lmx_runs": [asdict(r) for r in p.lmx_runs],
                    "steps": {side: _compact(steps) for side, steps in p.steps.items()},
                    **(
                        {
                            "again_ratio": p.again_ratio,
                            "again_ratios": p.again_ratios,
                            "again_runs": [asdict(r) for r in p.again_runs],
                        }
                        if p.again_runs
                        else {}
                    ),
                    **(
                        {
                            "engine_ratio": p.engine_ratio,
                            "engine": asdict(p.engine),
                            "engine_runs": [asdict(r) for r in p.engine_runs],
                        }
                        if p.engine is not None
                        else {}
                    ),
                }
                for p in self.points
            ],
        }

    def to_markdown(self) -> str:
        s = self.settings
        again = any(p.again_runs for p in self.points)
        lines = [
            f"# Throughput: lmx over HTTP vs raw BatchGenerator — `{self.preset}` on `{self.device}`",
            "",
            f"{s['prompt_tokens']} prompt tokens, {s['output_tokens']} output tokens (EOS ignored),"
            f" greedy, max_batch {s['max_batch']}, median of {s['repeats']} runs per point;"
            f" run {self.started_at}, {self.duration_s:.0f} s in all.",
            f"Versions: {', '.join(f'{k} {v}' for k, v in self.versions.items())}.",
            f"CPUs: {s.get('cpus', 'any')}"
            + (
                f"; each side's stepping thread on CPU {s['step_cpu']}, alone on its core."
                if s.get("step_cpu") is not None
                else "."
            ),
            *_prompt_cache_line(s.get("prompt_cache_bytes")),
            *_malloc_line(s.get("glibc_tunables")),
            "",
            "lmx/raw: the median over the repeats of lmx's run over raw's run of that repeat, then"
            " the lowest and highest of those pairs; raw max/min: raw's fastest run over its slowest,"
            " what the machine alone moved."
            + (
                " A/A: the same for a second run of raw in each repeat, where there is nothing to"
                " find: what a pair on this machine says of two equal sides."
                if again
                else ""
            ),
            "",
            "| streams | raw tok/s | lmx tok/s | lmx/raw (pairs) "
            + ("| A/A (pairs) " if again else "")
            + "| raw max/min | TTFT p50 ms raw / lmx | TTFT p99 ms raw / lmx "
            "| ITL p50 ms raw / lmx | ITL p99 ms raw / lmx | lmx CPU s server / client | errors |",
            "|---:" * (12 if again else 11) + "|",
        ]
        for p in self.points:
            r, x = p.raw, p.lmx
            lines.append(
                f"| {p.concurrency} | {r.output_tok_s:.1f} | {x.output_tok_s:.1f} "
                f"| {_ratio_cell(p.ratio, p.pair_ratios)} "
                + (f"| {_ratio_cell(p.again_ratio, p.again_ratios)} " if again else "")
                + f"| {p.raw_spread:.2f} "
                f"| {r.ttft_p50_ms:.1f} / {x.ttft_p50_ms:.1f} "
                f"| {r.ttft_p99_ms:.1f} / {x.ttft_p99_ms:.1f} "
                f"| {r.itl_p50_ms:.2f} / {x.itl_p50_ms:.2f} "
                f"| {r.itl_p99_ms:.2f} / {x.itl_p99_ms:.2f} "
                f"| {x.server_cpu_s:.1f} / {x.client_cpu_s:.1f} | {r.errors + x.errors} |"
            )
        if any(p.engine is not None for p in self.points):
            lines += [
                "",
                "lmx's engine without HTTP, same prompts:",
                "",
                "| streams | raw tok/s | engine tok/s | engine/raw "
                "| TTFT p50 ms raw / engine | ITL p50 ms raw / engine |",
                "|---:|---:|---:|---:|---:|---:|",
            ]
            for p in self.points:
                if p.engine is not None:
                    lines.append(
                        f"| {p.concurrency} | {p.raw.output_tok_s:.1f} "
                        f"| {p.engine.output_tok_s:.1f} | {p.engine_ratio:.2f} "
                        f"| {p.raw.ttft_p50_ms:.1f} / {p.engine.ttft_p50_ms:.1f} "
                        f"| {p.raw.itl_p50_ms:.2f} / {p.engine.itl_p50_ms:.2f} |"
                    )
        lines += self._parts_table()
        lines += self._ttft_table()
        lines += self._round_table()
        lines += self._step_table()
        met = sum(p.verdict == "met" for p in self.points)
        verdicts = "; ".join(f"{p.concurrency}: {cell(p.pairs)}, {p.verdict}" for p in self.points)
        lines += [
            "",
            f"Target lmx/raw ≥ {TARGET_RATIO} at every concurrency: **met at {met} of "
            f"{len(self.points)} points** at {CONFIDENCE:.0%} confidence: met where the "
            "distribution-free interval of the median of a point's pairs lies at or above the "
            f"target, not met where below, else undecided (as bench.pool has it): {verdicts}.",
        ]
        if again:
            passed = sum(
                Pairs(tuple(p.again_ratios)).verdict(TARGET_RATIO) == "met"
                for p in self.points
                if p.again_runs
            )
            counted = sum(1 for p in self.points if p.again_runs)
            lines[-1] += (
                f" The same test of raw against itself (A/A) passes at {passed} of {counted}"
                " points: where it fails, this run's pairs cannot tell a side"
                f" {1 - TARGET_RATIO:.0%} slower from an equal one."
            )
        if self.notes:
            lines += ["", *[f"- {n}" for n in self.notes]]
        return "\n".join(lines) + "\n"

    def _parts_table(self) -> list[str]:
        """lmx/raw split in two: lmx's own time between its steps, and its steps' speed."""
        if all(math.isnan(p.own_ratio) for p in self.points):
            return []
        lines = [
            "",
            "What lmx/raw is made of (medians over the repeats; their product is about lmx/raw):"
            " lmx's own time, lmx/raw had lmx's batch steps taken raw's time (what its work on"
            " each step's results, its waits for requests and HTTP at a run's ends leave of raw's"
            " rate); its steps' speed, raw's time in steps over lmx's for the same steps of the"
            " same BatchGenerator, which the machine moves as it moves raw max/min:",
            "",
            "| streams | lmx/raw | lmx's own time | its steps' speed | raw max/min |",
            "|---:|---:|---:|---:|---:|",
        ]
        for p in self.points:
            lines.append(
                f"| {p.concurrency} | {p.ratio:.2f} | {p.own_ratio:.3f} | {p.step_ratio:.3f} "
                f"| {p.raw_spread:.2f} |"
            )
        if not any(p.decode_cpu_ratios for p in self.points):
            return lines
        lines += [
            "",
            "Its decode steps (medians over the repeats): their speed, raw's mean decode step over"
            " lmx's; the same for the stepping thread's CPU time in them; and the share of a"
            " decode step each side's stepping thread spent off its core (waiting for the GIL, for"
            " a core), and its context switches in a decode step, voluntary (it blocked) and"
            " involuntary (preempted). Where the speed is below 1 and the CPU time is not, lmx's"
            " thread waited; where both are, its steps took more of the CPU's work:",
            "",
            "| streams | speed | CPU time | off its core: raw / lmx | blocked: raw / lmx "
            "| preempted: raw / lmx |",
            "|---:|---:|---:|---:|---:|---:|",
        ]
        for p in self.points:
            off = [
                _median([1 - r.decode_cpu_ms / r.decode_step_ms for r in runs])
                for runs in (p.raw_runs, p.lmx_runs)
            ]
            sides = (p.raw_runs, p.lmx_runs)
            switched = [
                " / ".join(f"{_median([getattr(r, key) for r in runs]):.2f}" for runs in sides)
                for key in ("decode_blocked", "decode_preempted")
            ]
            lines.append(
                f"| {p.concurrency} | {_median(p.decode_ratios):.3f} "
                f"| {_median(p.decode_cpu_ratios):.3f} | {off[0]:.1%} / {off[1]:.1%} "
                f"| {switched[0]} | {switched[1]} |"
            )
        return lines

    def _ttft_table(self) -> list[str]:
        """Mean time to first token, split where lmx can see it: the client's wait, the server's
        own (handler to first token), the engine's queue and prefill."""
        if all(math.isnan(p.lmx.queue_ms) for p in self.points):
            return []
        engine = any(p.engine is not None for p in self.points)
        head = "| streams | raw: TTFT / prefill steps "
        head += "| engine: TTFT / queue / prefill / step / prefill steps " if engine else ""
        head += "| lmx: TTFT client / server / queue / prefill / step / prefill steps |"
        lines = [
            "",
            "Where the time goes (means, ms; queue: waiting in the engine for the prefill to begin,"
            " prefill: from then to the first token, step: one batch step in the worker; prefill"
            " steps: steps that also did prompt work, each an extra forward pass for the whole"
            " batch, per request):",
            "",
            head,
            "|---:|---:|---:|" + ("---:|" if engine else ""),
        ]
        for p in self.points:
            r = p.raw
            row = f"| {p.concurrency} | {r.ttft_mean_ms:.1f} / {r.prefill_steps_per_request:.2f} "
            if engine:
                e = p.engine
                row += (
                    f"| {e.ttft_mean_ms:.1f} / {e.queue_ms:.1f} / {e.prefill_ms:.1f}"
                    f" / {e.step_ms:.2f} / {e.prefill_steps_per_request:.2f} "
                    if e is not None
                    else "| "
                )
            x = p.lmx
            row += (
                f"| {x.ttft_mean_ms:.1f} / {x.server_ttft_ms:.1f} / {x.queue_ms:.1f}"
                f" / {x.prefill_ms:.1f} / {x.step_ms:.2f} / {x.prefill_steps_per_request:.2f} |"
            )
            lines.append(row)
        return lines

    def _round_table(self) -> list[str]:
        """How a run's first round reached lmx's worker, stage by stage, and its prefills."""
        if all(math.isnan(p.lmx.round_worker_ms) for p in self.points):
            return []
        lines = [
            "",
            "A run's first round (one request per stream, sent together to an idle worker; medians"
            " over the runs): ms from its first request to its last as the clients began to send"
            " them, as they had written them, as the daemon began each, as each reached its engine"
            " and as the worker took each in; then the prompt steps that prefilled them (raw: one,"
            " when a round fits a group):",
            "",
            "| streams | raw: prompt steps | lmx: sent / written / daemon / engine / worker ms "
            "| lmx: prompt steps |",
            "|---:|---:|---:|---:|",
        ]
        for p in self.points:
            x = p.lmx
            lines.append(
                f"| {p.concurrency} | {p.raw.round_prompt_steps:.0f} "
                f"| {x.round_sent_ms:.1f} / {x.round_written_ms:.1f} / {x.round_api_ms:.1f}"
                f" / {x.round_engine_ms:.1f}"
                f" / {x.round_worker_ms:.1f} | {x.round_prompt_steps:.0f} |"
            )
        return lines

    def _step_table(self) -> list[str]:
        """Each side's batch steps, from the per-step records of its runs."""
        sides = [
            side
            for side in ("raw", "engine", "lmx")
            if any(
                not math.isnan(getattr(p, side).decode_step_ms)
                for p in self.points
                if getattr(p, side) is not None
            )
        ]
        if not sides:
            return []
        lines = [
            "",
            "Batch steps (means over a run, ms; decode: a step without prompt work, prompt: a step"
            " with it, p99 and max over all steps; after: the side's own work on a step's results,"
            " while the GPU runs the next; idle: the share of the run's span between steps, that"
            " work and the waits for requests):",
            "",
            "| streams | "
            + " | ".join(f"{side}: decode / prompt / p99 / max / after / idle" for side in sides)
            + " |",
            "|---:|" + "---:|" * len(sides),
        ]
        for p in self.points:
            cells = []
            for side in sides:
                st: PointStats | None = getattr(p, side)
                cells.append(
                    ""
                    if st is None
                    else f"{st.decode_step_ms:.2f} / {st.prompt_step_ms:.2f}"
                    f" / {st.step_p99_ms:.1f} / {st.step_max_ms:.1f} / {st.after_step_ms:.2f}"
                    f" / {st.idle_share:.1%}"
                )
            lines.append(f"| {p.concurrency} | " + " | ".join(cells) + " |")
        return lines

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Report:
        """The report a `to_json` came from (the steps' times then count from each run's first
        step), to render it again."""
        return cls(
            preset=data["preset"],
            device=data["device"],
            settings=data["settings"],
            versions=data["versions"],
            started_at=data["started_at"],
            duration_s=data["duration_s"],
            notes=data["notes"],
            points=[
                Point(
                    concurrency=p["concurrency"],
                    raw=PointStats(**p["raw"]),
                    lmx=PointStats(**p["lmx"]),
                    raw_runs=tuple(PointStats(**r) for r in p["raw_runs"]),
                    lmx_runs=tuple(PointStats(**r) for r in p["lmx_runs"]),
                    engine=PointStats(**p["engine"]) if "engine" in p else None,
                    engine_runs=tuple(PointStats(**r) for r in p.get("engine_runs", ())),
                    steps={side: _expand(cols) for side, cols in p["steps"].items()},
                    again_runs=tuple(PointStats(**r) for r in p.get("again_runs", ())),
                )
                for p in data["points"]
            ],
        )

    def write(self, out_dir: Path, stem: str | None = None) -> list[Path]:
        """JSON, Markdown and the plots as `stem`.* (default: `self.stem`) in `out_dir`."""
        plots = {"": self._plot, "-steps": self._plot_steps}
        return write_result(
            out_dir / (stem or self.stem), self.to_json(), self.to_markdown(), plots
        )

    def _plot(self, path: Path) -> bool:
        plt = pyplot()
        if plt is None:
            return False
        xs = [p.concurrency for p in self.points]
        fig, (top, bottom) = plt.subplots(
            2, 1, figsize=(7, 6.5), sharex=True, gridspec_kw={"height_ratios": [2, 1]}
        )
        top.plot(xs, [p.raw.output_tok_s for p in self.points], "o-", label="raw BatchGenerator")
        top.plot(xs, [p.lmx.output_tok_s for p in self.points], "s-", label="lmx over HTTP")
        if all(p.engine is not None for p in self.points):
            engine = [p.engine.output_tok_s for p in self.points if p.engine is not None]
            top.plot(xs, engine, "^:", label="lmx engine, no HTTP")
        top.set_ylabel("output tok/s (aggregate)")
        top.set_ylim(bottom=0)
        top.set_title(f"{self.preset} on {self.device}: throughput vs concurrency")
        top.grid(True, alpha=0.3)
        top.legend()
        highest = 1.1
        series = [("lmx / raw", [(p.ratio, p.pair_ratios) for p in self.points], "d-", "C2")]
        if all(p.again_runs for p in self.points):
            aa = [(p.again_ratio, p.again_ratios) for p in self.points]
            series.append(("A/A: raw again / raw", aa, "x:", "C7"))
        for label, points, fmt, color in series:
            ratios = [r for r, _ in points]
            lows = [r - min(pairs, default=r) for r, pairs in points]
            highs = [max(pairs, default=r) - r for r, pairs in points]
            bottom.errorbar(
                xs,
                ratios,
                yerr=[lows, highs],
                fmt=fmt,
                color=color,
                capsize=3,
                label=f"{label} (median, lowest-highest pair)",
            )
            highest = max(highest, *(r + h for r, h in zip(ratios, highs, strict=True)))
        bottom.axhline(TARGET_RATIO, color="C3", ls="--", label=f"target {TARGET_RATIO}")
        bottom.set_ylim(0, highest * 1.05)
        bottom.set_xscale("log", base=2)
        bottom.set_xticks(xs, [str(x) for x in xs])
        bottom.set_xlabel("concurrent streams")
        bottom.set_ylabel("ratio")
        bottom.grid(True, alpha=0.3)
        bottom.legend(loc="lower left")
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return True

    def _plot_steps(self, path: Path) -> bool:
        """Every step of each side's last run at each concurrency: its duration over time."""
        points = [p for p in self.points if p.steps]
        plt = pyplot()
        if plt is None or not points:
            return False
        fig, axes = plt.subplots(
            len(points), 1, figsize=(8, 1.9 * len(points) + 0.6), squeeze=False
        )
        styles = {"raw": ("C0", "raw BatchGenerator"), "engine": ("C2", "lmx engine, no HTTP")}
        styles["lmx"] = ("C1", "lmx over HTTP")
        for ax, p in zip(axes[:, 0], points, strict=True):
            for side, steps in p.steps.items():
                if not steps:
                    continue
                color, label = styles[side]
                t0 = steps[0].t
                for prompt_work, marker in ((False, "."), (True, "x")):
                    xs = [s.t - t0 for s in steps if s.prompt_work == prompt_work]
                    ys = [s.ms for s in steps if s.prompt_work == prompt_work]
                    what = "step with prompt work" if prompt_work else "decode step"
                    ax.plot(xs, ys, marker, color=color, ms=3, label=f"{label}: {what}")
            ax.set_yscale("log")
            ax.set_ylabel(f"{p.concurrency} streams\nstep ms")
            ax.grid(True, alpha=0.3)
        axes[0, 0].set_title(f"{self.preset} on {self.device}: every batch step of one run")
        axes[0, 0].legend(fontsize=7, ncol=2, loc="upper right")
        axes[-1, 0].set_xlabel("seconds since the run's first step")
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return True


def _compact(steps: tuple[Step, ...]) -> dict[str, Any]:
    """Steps as columns, times from the first step: small enough to keep beside the summary."""
    t0 = steps[0].t if steps else 0.0
    return {
        "t_s": [round(s.t - t0, 4) for s in steps],
        "ms": [round(s.ms, 2) for s in steps],
        "decoded": [s.decoded for s in steps],
        "prompted": [s.prompted for s in steps],
        "started": [s.started for s in steps],
        "after_ms": [round(s.after_ms, 2) for s in steps],
        "cache_ms": [round(s.cache_ms, 2) for s in steps],
        "cpu_ms": [None if math.isnan(s.cpu_ms) else round(s.cpu_ms, 2) for s in steps],
        "blocked": [None if math.isnan(s.blocked) else int(s.blocked) for s in steps],
        "preempted": [None if math.isnan(s.preempted) else int(s.preempted) for s in steps],
    }


def _expand(cols: dict[str, Any]) -> tuple[Step, ...]:
    """`_compact` undone (results from before cache_ms, cpu_ms or the context switches have
    none of them)."""
    n = len(cols["t_s"])

    def measured(key: str) -> list[float]:
        return [math.nan if v is None else v for v in cols.get(key, [None] * n)]

    rows = zip(
        cols["t_s"],
        cols["ms"],
        cols["decoded"],
        cols["prompted"],
        cols["started"],
        cols["after_ms"],
        cols.get("cache_ms", [0.0] * n),
        measured("cpu_ms"),
        measured("blocked"),
        measured("preempted"),
        strict=True,
    )
    return tuple(Step(*row) for row in rows)


def join(reports: Sequence[Report]) -> Report:
    """One report of the points of several runs with the same settings (a run split over calls
    to a machine that allows only so long a call), in the order given."""
    first = reports[0]
    for other in reports[1:]:
        for key in ("preset", "device", "settings"):
            if getattr(other, key) != getattr(first, key):
                raise ValueError(
                    f"cannot join runs with different {key}: "
                    f"{getattr(first, key)!r} and {getattr(other, key)!r}"
                )
    notes = [n for r in reports for n in r.notes]
    return replace(
        first,
        points=[p for r in reports for p in r.points],
        duration_s=math.fsum(r.duration_s for r in reports),
        notes=list(dict.fromkeys(notes)),
    )


def main(argv: list[str] | None = None) -> None:
    """Render result files again from their JSON, e.g. after a change to the tables or plots;
    with --join, write one result of several runs' points."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("files", nargs="+", type=Path, help="throughput-*.json.gz (or .json)")
    parser.add_argument(
        "--join", type=Path, metavar="OUT", help="one result of all FILES' points, as OUT.*"
    )
    args = parser.parse_args(argv)
    reports = [Report.from_json(read_json(path)) for path in args.files]
    if args.join is not None:
        try:
            joined = join(reports)
        except ValueError as e:
            parser.error(str(e))
        outputs = [(joined, args.join)]
    else:
        outputs = list(zip(reports, args.files, strict=True))
    for report, path in outputs:
        for written in report.write(path.parent, stem_of(path)):
            print(f"wrote {written}")


if __name__ == "__main__":
    main()
