"""Per-request timing traces and the statistics one measurement point reports.

bench.raw and bench.loadgen fill `RequestTrace`s with the same clock (time.perf_counter);
`summarize` turns them into aggregate output tok/s, TTFT and inter-token latency percentiles.
"""

from __future__ import annotations

import itertools
import math
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, fields, replace

import numpy as np

from lmx.runtime.steptrace import Arrival, Step, TraceReader


@dataclass
class RequestTrace:
    """One request: when it was sent, when each piece of output arrived, how many tokens."""

    sent_s: float
    chunk_s: list[float] = field(default_factory=list)  # raw: one per token; HTTP: one per chunk
    written_s: float | None = None  # HTTP: the request's last byte went to the socket
    output_tokens: int = 0  # raw: tokens seen; HTTP: usage.completion_tokens
    error: str | None = None
    queue_s: float | None = None  # lmx's engine's own account, where the side can see it
    prefill_s: float | None = None


@dataclass(frozen=True)
class PointStats:
    concurrency: int
    requests: int
    errors: int
    output_tokens: int
    wall_s: float
    output_tok_s: float
    ttft_p50_ms: float
    ttft_p99_ms: float
    ttft_mean_ms: float
    itl_p50_ms: float
    itl_p99_ms: float
    tpot_mean_ms: float  # (last chunk - first chunk) / (tokens - 1), averaged over requests
    chunks_per_token: float  # 1.0 when every token streamed as its own chunk
    client_cpu_s: float = 0.0
    server_cpu_s: float = 0.0
    # Where lmx's time goes (means; NaN where not measured): the server's own TTFT (from its
    # /metrics), the wait in the engine before the prefill, the prefill, a batch step.
    server_ttft_ms: float = math.nan
    queue_ms: float = math.nan
    prefill_ms: float = math.nan
    step_ms: float = math.nan
    # Steps that also did prompt work (extra forward passes for the whole batch), per request.
    prefill_steps_per_request: float = math.nan
    # From the per-step records (lmx.runtime.steptrace), where the side has them: the mean step
    # without and with prompt work, the slowest 1% and the slowest step, the side's own work on a
    # step's results, and the share of the run's steps' span that no step was running (the side's
    # work between steps and its waits for requests, whatever the machine's speed; on a GPU that
    # work overlaps the step already launched, so the share bounds what it costs from above).
    decode_step_ms: float = math.nan
    # Of a decode step, the stepping thread's CPU time (the rest it waited off its core), and
    # its context switches: voluntary (it blocked) and involuntary (it was preempted).
    decode_cpu_ms: float = math.nan
    decode_blocked: float = math.nan
    decode_preempted: float = math.nan
    prompt_step_ms: float = math.nan
    step_p99_ms: float = math.nan
    step_max_ms: float = math.nan
    after_step_ms: float = math.nan
    idle_share: float = math.nan
    busy_s: float = math.nan  # the run's time in steps: their durations summed
    # A run's first round (its first `concurrency` requests, sent together to an idle worker):
    # how far apart they were, first to last, as the clients began to send them, as they had
    # written them, as the daemon began each, as each reached its engine and as the worker took
    # each in (lmx.runtime.steptrace's Arrivals), and the prompt steps that prefilled them all.
    round_sent_ms: float = math.nan
    round_written_ms: float = math.nan
    round_api_ms: float = math.nan
    round_engine_ms: float = math.nan
    round_worker_ms: float = math.nan
    round_prompt_steps: float = math.nan


def _pct(values: Sequence[float], q: float) -> float:
    return float(np.percentile(values, q)) * 1e3 if values else math.nan


def summarize(
    traces: Sequence[RequestTrace],
    concurrency: int,
    *,
    client_cpu_s: float = 0.0,
    server_cpu_s: float = 0.0,
) -> PointStats:
    """Aggregate tok/s is all output tokens over the span from the first send to the last chunk."""
    ok = [t for t in traces if t.error is None and t.chunk_s]
    ttft = [t.chunk_s[0] - t.sent_s for t in ok]
    itl = [b - a for t in ok for a, b in zip(t.chunk_s, t.chunk_s[1:], strict=False)]
    tpot = [
        (t.chunk_s[-1] - t.chunk_s[0]) / (t.output_tokens - 1) for t in ok if t.output_tokens > 1
    ]
    tokens = sum(t.output_tokens for t in ok)
    chunks = sum(len(t.chunk_s) for t in ok)
    queue = [t.queue_s for t in ok if t.queue_s is not None]
    prefill = [t.prefill_s for t in ok if t.prefill_s is not None]
    wall = max(t.chunk_s[-1] for t in ok) - min(t.sent_s for t in traces) if ok else math.nan
    return PointStats(
        concurrency=concurrency,
        requests=len(traces),
        errors=len(traces) - len(ok),
        output_tokens=tokens,
        wall_s=wall,
        output_tok_s=tokens / wall if ok and wall > 0 else 0.0,
        ttft_p50_ms=_pct(ttft, 50),
        ttft_p99_ms=_pct(ttft, 99),
        ttft_mean_ms=statistics.fmean(ttft) * 1e3 if ttft else math.nan,
        itl_p50_ms=_pct(itl, 50),
        itl_p99_ms=_pct(itl, 99),
        tpot_mean_ms=statistics.fmean(tpot) * 1e3 if tpot else math.nan,
        chunks_per_token=chunks / tokens if tokens else math.nan,
        client_cpu_s=client_cpu_s,
        server_cpu_s=server_cpu_s,
        queue_ms=statistics.fmean(queue) * 1e3 if queue else math.nan,
        prefill_ms=statistics.fmean(prefill) * 1e3 if prefill else math.nan,
    )


def settled_steps(trace: TraceReader, start: float, end: float, wait_s: float = 3.0) -> list[Step]:
    """The Steps a worker logged in [start, end), once there are some and the log stopped growing
    (a worker writes its lines when its batch goes idle, after the last response went out).
    Empty if none came within `wait_s`."""
    steps: list[Step] = []
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        again = trace.steps(start, end)
        if again and len(again) == len(steps):
            break
        steps = again
        time.sleep(0.02)
    return steps


def _idle_share(steps: Sequence[Step]) -> float:
    """The share of `steps`' span (first start to last end) that lay between steps."""
    between = sum(max(0.0, b.t - a.t - a.ms / 1e3) for a, b in itertools.pairwise(steps))
    span = steps[-1].t + steps[-1].ms / 1e3 - steps[0].t
    return between / span if span > 0 else 0.0


def with_steps(stats: PointStats, steps: Sequence[Step]) -> PointStats:
    """`stats` with its step fields from one run's Steps (unchanged without any)."""
    if not steps:
        return stats
    ms = [s.ms for s in steps]
    prompt = [s.ms for s in steps if s.prompt_work]
    decoding = [s for s in steps if not s.prompt_work]

    def decode_mean(field: str) -> float:
        # NaN from records without the field (written before it was measured) makes it NaN
        return statistics.fmean(getattr(s, field) for s in decoding) if decoding else math.nan

    return replace(
        stats,
        decode_step_ms=decode_mean("ms"),
        decode_cpu_ms=decode_mean("cpu_ms"),
        decode_blocked=decode_mean("blocked"),
        decode_preempted=decode_mean("preempted"),
        prompt_step_ms=statistics.fmean(prompt) if prompt else math.nan,
        step_p99_ms=float(np.percentile(ms, 99)),
        step_max_ms=max(ms),
        after_step_ms=statistics.fmean(s.after_ms for s in steps),
        idle_share=_idle_share(steps),
        busy_s=math.fsum(ms) / 1e3,
        step_ms=statistics.fmean(ms),
        prefill_steps_per_request=len(prompt) / stats.requests if stats.requests else math.nan,
    )


def with_first_round(
    stats: PointStats,
    traces: Sequence[RequestTrace],
    arrivals: Sequence[Arrival],
    steps: Sequence[Step],
) -> PointStats:
    """`stats` with its first round's fields, from one run's traces and what the daemon and the
    worker logged of it (fields without records stay NaN)."""
    n = stats.concurrency

    def spread_ms(times: Sequence[float | None]) -> float:
        first = sorted(t for t in times if t is not None)[:n]
        return (first[-1] - first[0]) * 1e3 if len(first) == n else math.nan

    prompted, prompt_steps = 0, 0
    for s in steps:
        if prompted >= n:
            break
        if s.prompted:
            prompted += s.prompted
            prompt_steps += 1
    return replace(
        stats,
        round_sent_ms=spread_ms([t.sent_s for t in traces]),
        round_written_ms=spread_ms([t.written_s for t in traces]),
        round_api_ms=spread_ms([a.t for a in arrivals if a.at == "api"]),
        round_engine_ms=spread_ms([a.t for a in arrivals if a.at == "engine"]),
        round_worker_ms=spread_ms([a.t for a in arrivals if a.at == "worker"]),
        round_prompt_steps=float(prompt_steps) if prompted >= n else math.nan,
    )


def median_stats(runs: Sequence[PointStats]) -> PointStats:
    """The field-wise median of repeated runs of one point (errors: the total)."""
    values: dict[str, float | int] = {}
    for f in fields(PointStats):
        column = [getattr(r, f.name) for r in runs]
        if f.name == "errors":
            values[f.name] = sum(column)
        elif f.type == "int":
            values[f.name] = int(statistics.median_low(column))
        else:
            values[f.name] = statistics.median(column)
    return PointStats(**values)  # type: ignore[arg-type]
