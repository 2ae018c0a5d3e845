"""A record per batch step, and per request at each stage it reaches, for finding where time goes.

With `LMX_STEP_TRACE_DIR` set to a directory, each MLX worker appends one JSON object per
BatchGenerator step to `steps-<pid>.jsonl` there: when the step began (time.perf_counter, one clock
for every process of the machine), how long it took, how many sequences it decoded, how many prompts
it processed a chunk of, how many finished their prompt (each such group costs a forward pass of its
own), the stepping thread's CPU time in it and its context switches (Linux), and the worker's own
work on the step's results (and the part of it that took ended sequences out of the batch and
stored their KV caches).
bench.run_throughput sets it and keeps the same records of its raw BatchGenerator runs, so the two
can be set side by side step by step.

The daemon and its workers also append an Arrival to `arrivals-<pid>.jsonl` each time a
generation request reaches a stage (the API, its engine, the worker): how a burst of requests
spreads out on its way to one prefill; and one each time a request's cancel reaches the worker:
how many steps a cancelled sequence took after it.
"""

from __future__ import annotations

import json
import math
import os
import resource
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ENV = "LMX_STEP_TRACE_DIR"
_FLUSH_EVERY = 1024


@dataclass(frozen=True)
class Step:
    t: float  # perf_counter when the step began, s
    ms: float  # the step itself (BatchGenerator.next)
    decoded: int  # sequences that got a token
    prompted: int  # prompts a chunk of which went through the model
    started: int  # prompts that finished and joined the decoding batch
    after_ms: float = 0.0  # the worker's work on the results (text, stop strings, messages)
    cache_ms: float = 0.0  # of after_ms: ended sequences out of the batch, their caches stored
    # The stepping thread's CPU time in the step: less than `ms` by the time it waited off its
    # core (for the GIL, for a core, for the GPU where its wait sleeps instead of spinning).
    cpu_ms: float = math.nan
    # The stepping thread's context switches in the step (Linux): voluntary, each a wait off its
    # core (for the GIL, a lock, a sleeping wait for the GPU); involuntary, the kernel gave its
    # core to another thread.
    blocked: float = math.nan
    preempted: float = math.nan

    @property
    def prompt_work(self) -> bool:
        return self.prompted + self.started > 0


@dataclass(frozen=True)
class Arrival:
    t: float  # perf_counter, s
    # "api": the daemon began handling it; "engine": handed to its engine; "worker"; "cancel": its
    # cancel reached the worker
    at: str


def step_of(
    t0: float,
    t1: float,
    prompts: Sequence[Any],
    responses: Sequence[Any],
    after_ms: float = 0.0,
    cache_ms: float = 0.0,
    cpu_ms: float = math.nan,
    switched: tuple[float, float] = (math.nan, math.nan),
) -> Step:
    """The Step for one `BatchGenerator.next()` that ran from t0 to t1 and returned these;
    `switched`: its thread's context switches in it (`switches_between`)."""
    started = sum(1 for p in prompts if p.end_of_prompt)
    return Step(
        t=t0,
        ms=(t1 - t0) * 1e3,
        decoded=len(responses),
        prompted=len(prompts) - started,
        started=started,
        after_ms=after_ms,
        cache_ms=cache_ms,
        cpu_ms=cpu_ms,
        blocked=switched[0],
        preempted=switched[1],
    )


_RUSAGE_THREAD: int | None = getattr(resource, "RUSAGE_THREAD", None)  # Linux only


def switches() -> tuple[int, int] | None:
    """The calling thread's voluntary and involuntary context switches so far; None where the
    system does not count them per thread."""
    if _RUSAGE_THREAD is None:
        return None
    usage = resource.getrusage(_RUSAGE_THREAD)
    return usage.ru_nvcsw, usage.ru_nivcsw


def switches_between(
    before: tuple[int, int] | None, after: tuple[int, int] | None
) -> tuple[float, float]:
    """The voluntary and involuntary switches between two `switches()` (NaN without them)."""
    if before is None or after is None:
        return math.nan, math.nan
    return float(after[0] - before[0]), float(after[1] - before[1])


class TraceLog:
    """Appends records (Steps or Arrivals) to `<directory>/<kind>-<pid>.jsonl`; lines reach the
    file on flush() (and every `_FLUSH_EVERY` records), not in the middle of a busy batch. The
    file is open only while a flush writes. A record is made a line only then: written between
    two steps, its JSON took 30 us of the worker's ~90 between them (2-core CPU), which the
    bench then counted as lmx's and the raw loop it compares with does not pay."""

    def __init__(self, directory: Path, kind: str) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.path = directory / f"{kind}-{os.getpid()}.jsonl"
        self._pending: list[Step | Arrival] = []

    @classmethod
    def from_env(cls, kind: str) -> TraceLog | None:
        directory = os.environ.get(ENV)
        return cls(Path(directory), kind) if directory else None

    @property
    def pending(self) -> int:
        """Records written since the last flush."""
        return len(self._pending)

    def write(self, record: Step | Arrival) -> None:
        self._pending.append(record)
        if len(self._pending) >= _FLUSH_EVERY:
            self.flush()

    def flush(self) -> None:
        if self._pending:
            # vars(), not asdict(): the records are flat, and it is three times as fast
            lines = [json.dumps(vars(r), separators=(",", ":")) for r in self._pending]
            with self.path.open("a", encoding="utf-8") as f:
                f.write("\n".join(lines) + "\n")
            self._pending.clear()


class TraceReader:
    """The records logged under a directory, read as they are appended: each read parses only
    the lines added since the one before. Reading whole logs again after every run made each run
    of a long bench slower than the last (30,000 lines: 0.27 s a read on the 2-core CPU)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._parsed: dict[Path, int] = {}  # bytes of each log read so far
        self._steps: list[Step] = []
        self._arrivals: list[Arrival] = []

    def steps(self, start: float, end: float) -> list[Step]:
        """Every Step logged that began in [start, end), in time order."""
        self._catch_up()
        return sorted((s for s in self._steps if start <= s.t < end), key=lambda s: s.t)

    def arrivals(self, start: float, end: float) -> list[Arrival]:
        """Every Arrival logged in [start, end), in time order."""
        self._catch_up()
        return sorted((a for a in self._arrivals if start <= a.t < end), key=lambda a: a.t)

    def _catch_up(self) -> None:
        for path in sorted(self.directory.glob("*-*.jsonl")):
            kind = path.name.partition("-")[0]
            if kind not in ("steps", "arrivals"):
                continue
            done = self._parsed.get(path, 0)
            with path.open("rb") as f:
                f.seek(done)
                data = f.read()
            data = data[: data.rfind(b"\n") + 1]  # a line still being written waits
            self._parsed[path] = done + len(data)
            records = [json.loads(line) for line in data.splitlines() if line]
            if kind == "steps":
                self._steps += [Step(**r) for r in records]
            else:
                self._arrivals += [Arrival(**r) for r in records]
