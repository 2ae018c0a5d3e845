"""Raw's loop with and without a load on the other CPUs: does work elsewhere slow a decode step?

In an HTTP run (bench.run_throughput) lmx's daemon and clients work on other cores while its
worker steps the model; raw's loop has nothing beside it. bench.worker_ab takes HTTP out and
compares the loops; this keeps raw's loop and brings loads in beside it instead. One process, one
model: blocks of bench.raw's loop (as worker_ab runs them) alternate between modes

- raw: nothing beside it;
- spinN: N processes in a pure-Python busy loop, one per CPU (the CPU, a small working set);
- memN: N processes copying 256 MiB arrays back and forth (memory bandwidth, the shared cache);
- serveN: lmx's app over uvicorn with bench.http_overhead's free engine, which hands every live
  stream a token each `--step-ms`, and N client processes streaming `--serve-streams` streams
  from it through bench.loadgen: an HTTP run's daemon and clients, without a model;
- worker_ab's own modes (thread: lmx's worker, stepping as in the daemon), as references.

A load runs only during its mode's blocks (SIGCONT before, SIGSTOP after, outside the timing)
and on the CPUs outside the stepping CPU's core (`--step-cpu`; all of them without). Per mode,
the tables add the CPUs the load kept busy during its blocks. Pairs are pooled as worker_ab's.
Writes bench/results/load-ab-<preset>-<label>.{json,md}.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import select
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mlx_lm import load as mlx_load

from bench import worker_ab
from bench.cpus import core_of
from bench.http_overhead import start_server
from bench.loadgen import Target, run_load
from bench.report import write_result
from bench.synth import PRESET_NAMES, ensure_model
from bench.workload import Workload, make_prompts

LOADS = ("spin", "mem", "serve")
_LOAD_MODE = re.compile(rf"({'|'.join(LOADS)})([1-9][0-9]*)")
# Each prints READY once under way (start_load waits for it).
_SCRIPTS = {
    "spin": "print('ready', flush=True)\nwhile True:\n    pass\n",
    "mem": (
        "import numpy as np\n"
        "a = np.ones(1 << 25)\n"  # 256 MiB of float64
        "b = np.empty_like(a)\n"
        "print('ready', flush=True)\n"
        "while True:\n"
        "    np.copyto(b, a)\n"
        "    np.copyto(a, b)\n"
    ),
}
READY = b"ready\n"
_READY_S = 60.0  # for a load's processes to be under way
_RESUME_S = 0.2  # after SIGCONT, for the load to run again (a serve load's streams to flow)


class LoadedSide(worker_ab._RawSide):
    """raw's loop beside `procs`, which run during its blocks only; the CPUs they kept busy per
    block (their CPU seconds over the block's wall seconds) in `busy`."""

    def __init__(self, model: Any, prompt_tokens: int, procs: Sequence[subprocess.Popen[bytes]]):
        super().__init__(model, prompt_tokens)
        self.procs = list(procs)
        self.busy: list[float] = []
        self._since = (0.0, 0.0)
        self._signal(signal.SIGSTOP)

    def _alive(self) -> None:
        for p in self.procs:
            if p.poll() is not None:
                raise RuntimeError(f"a load process ended (exit code {p.returncode}): {p.args!r}")

    def _signal(self, sig: signal.Signals) -> None:
        self._alive()
        for p in self.procs:
            os.kill(p.pid, sig)

    def _cpu_s(self) -> float:
        """The CPU seconds the load's processes have used, to the nanosecond: psutil's count
        clock ticks (10 ms), to which a short block's serve load (a few ms of CPU) can round."""
        self._alive()
        return sum(time.clock_gettime(_cpu_clock(p.pid)) for p in self.procs)

    def before(self) -> None:
        self._signal(signal.SIGCONT)
        time.sleep(_RESUME_S)
        self._since = (time.perf_counter(), self._cpu_s())

    def after(self) -> None:
        t0, cpu0 = self._since
        self.busy.append((self._cpu_s() - cpu0) / (time.perf_counter() - t0))
        self._signal(signal.SIGSTOP)

    def close(self) -> None:
        _end(self.procs)
        super().close()


def _cpu_clock(pid: int) -> int:
    """The clock of process `pid`'s CPU time, all its threads' (those ended too), as glibc's
    clock_getcpuclockid makes it on Linux (which Python does not wrap)."""
    return (~pid << 3) | 2  # the kernel's MAKE_PROCESS_CPUCLOCK(pid, CPUCLOCK_SCHED)


def _end(procs: Sequence[subprocess.Popen[bytes]]) -> None:
    for p in procs:
        p.kill()
        p.wait()
        if p.stdout is not None:
            p.stdout.close()


def _load_cpus(step_cpu: int | None) -> list[int]:
    cpus = sorted(os.sched_getaffinity(0))
    if step_cpu is None:
        return cpus
    return [c for c in cpus if c not in core_of(step_cpu)]


def _start(argv: list[str], cpus: Sequence[int]) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE)
    os.sched_setaffinity(proc.pid, set(cpus))
    return proc


def _await_ready(procs: Sequence[subprocess.Popen[bytes]]) -> None:
    """Wait until each process has said READY: its start (imports, allocations; a serve client's
    first round, a CPU second) over before the load's first block."""
    deadline = time.monotonic() + _READY_S
    for p in procs:
        assert p.stdout is not None
        ready, _, _ = select.select([p.stdout], [], [], max(0.0, deadline - time.monotonic()))
        if not ready or p.stdout.readline() != READY:
            raise RuntimeError(f"a load process was not under way within {_READY_S} s: {p.args!r}")


def start_load(
    kind: str, n: int, cpus: Sequence[int], *, step_ms: float, streams: int
) -> list[subprocess.Popen[bytes]]:
    """`kind`'s load of `n` processes on `cpus` (spin and mem: one CPU each, in turn), under way
    when this returns (a serve load's clients streaming)."""
    procs: list[subprocess.Popen[bytes]] = []  # the server, if any, answers already
    if kind == "serve":
        server, url = start_server(step_ms, cpus=cpus)
        procs.append(server)
        per = [streams // n + (i < streams % n) for i in range(n)]
        runs = [
            ([sys.executable, "-m", "bench.load_ab", "--client", url, str(k)], cpus)
            for k in per
            if k
        ]
    else:
        runs = [([sys.executable, "-c", _SCRIPTS[kind]], [cpus[i % len(cpus)]]) for i in range(n)]
    started: list[subprocess.Popen[bytes]] = []
    try:
        for argv, on in runs:
            started.append(_start(argv, on))
        _await_ready(started)
    except BaseException:
        _end(procs + started)
        raise
    return procs + started


def client(url: str, streams: int) -> None:
    """A serve load's client process: `streams` streams of 64 tokens each, round after round."""
    workload = Workload(streams, 2, 16, 64)
    prompts = make_prompts(workload, range(8, 64), seed=streams)

    def one_round() -> None:
        asyncio.run(run_load(Target(url, "zero"), workload, prompts, timeout_s=3600))

    one_round()
    sys.stdout.buffer.write(READY)  # to start_load
    sys.stdout.flush()
    while True:
        one_round()


def side_maker(
    cpus: Sequence[int], *, step_ms: float, streams: int
) -> tuple[worker_ab.MakeSide, dict[str, list[LoadedSide]]]:
    """worker_ab's side factory with the load modes added, their loads on `cpus`; the loaded
    sides it made, per mode."""
    made: dict[str, list[LoadedSide]] = {}

    def make(mode: str, model_dir: Path, loaded: Any, prompt_tokens: int) -> worker_ab._Side:
        if (m := _LOAD_MODE.fullmatch(mode)) is None:
            return worker_ab._make_side(mode, model_dir, loaded, prompt_tokens)
        model = (mlx_load(str(model_dir)) if loaded is None else loaded)[0]
        procs = start_load(m[1], int(m[2]), cpus, step_ms=step_ms, streams=streams)
        try:
            side = LoadedSide(model, prompt_tokens, procs)
        except BaseException:
            _end(procs)
            raise
        made.setdefault(mode, []).append(side)
        return side

    return make, made


def busy_by_mode(made: dict[str, list[LoadedSide]]) -> dict[str, list[float]]:
    """Per load mode, the CPUs its load kept busy in each of its blocks."""
    return {mode: [b for side in sides for b in side.busy] for mode, sides in made.items()}


def busy_table(busy_of: dict[str, list[float]]) -> list[str]:
    """Per load mode, the CPUs its load kept busy during its blocks: median [lowest–highest]."""
    lines = ["", "| load | CPUs busy during its blocks |", "|---|---:|"]
    for mode, busy in busy_of.items():
        lines.append(
            f"| {mode} | {statistics.median(busy):.2f} [{min(busy):.2f}–{max(busy):.2f}] |"
        )
    return lines


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--preset", choices=PRESET_NAMES, default="tiny")
    p.add_argument("--model", type=Path, help="a model directory instead of --preset's")
    p.add_argument("--models-dir", type=Path, default=Path("bench/.models"))
    p.add_argument("--modes", default="raw,spin4,mem2,serve8,thread")
    p.add_argument("--concurrency", default="16")
    p.add_argument("--seconds", type=float, default=240.0, help="per concurrency")
    p.add_argument("--max-rounds", type=int, default=10_000)
    p.add_argument("--requests", type=int, default=2, help="per stream per block")
    p.add_argument("--step-cpu", type=int, help="Linux: the stepping thread on this CPU alone")
    p.add_argument(
        "--step-ms", type=float, default=7.5, help="serve loads: the free engine's step time"
    )
    p.add_argument("--serve-streams", type=int, default=16, help="serve loads: streams in all")
    p.add_argument("--device-label", help="names the result files (default: from MLX)")
    p.add_argument("--out", type=Path, default=Path("bench/results"))
    p.add_argument("--client", nargs=2, metavar=("URL", "STREAMS"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.client:
        client(args.client[0], int(args.client[1]))
        return
    modes = args.modes.split(",")
    known = worker_ab.MODES
    if bad := [m for m in modes if m not in known and not _LOAD_MODE.fullmatch(m)]:
        p.error(
            f"--modes: unknown {', '.join(bad)}; known: {', '.join(known)} and "
            f"{', '.join(k + 'N' for k in LOADS)} (N processes, N >= 1)"
        )
    if len(modes) < 2:
        p.error("--modes: name two or more")
    if not hasattr(os, "sched_getaffinity"):
        p.error("needs CPU affinity, which this platform does not have (Linux has)")
    concurrency = worker_ab.concurrency_arg(p, args.concurrency)
    worker_ab.at_least(
        p,
        ("--concurrency", min(concurrency), 1),
        ("--requests", args.requests, 1),
        ("--max-rounds", args.max_rounds, 1),
        ("--serve-streams", args.serve_streams, 1),
    )
    if args.step_ms <= 0:
        p.error(f"--step-ms: {args.step_ms} is not above 0")
    if args.step_cpu is not None and args.step_cpu not in os.sched_getaffinity(0):
        p.error(f"--step-cpu: {args.step_cpu} is not among this process's CPUs")
    cpus = _load_cpus(args.step_cpu)
    if not cpus:
        p.error(f"--step-cpu: core {sorted(core_of(args.step_cpu))} leaves no CPU for loads")
    model_dir = args.model or ensure_model(args.preset, args.models_dir)
    label = worker_ab.device_label(args.device_label)
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    make, made = side_maker(cpus, step_ms=args.step_ms, streams=args.serve_streams)
    points, _ = worker_ab.measure(
        model_dir,
        concurrency=concurrency,
        seconds=args.seconds,
        modes=modes,
        requests=args.requests,
        step_cpu=args.step_cpu,
        max_rounds=args.max_rounds,
        make_side=make,
    )
    name = args.preset if args.model is None else model_dir.name
    pinned = f"raw's loop on CPU {args.step_cpu}" if args.step_cpu is not None else "nothing pinned"
    notes = [
        f"Run {started}; {args.requests} requests per stream per block, 64 prompt and 64 output "
        f"tokens, greedy, EOS ignored; {pinned}, the loads on CPUs {','.join(map(str, cpus))}; "
        f"serve loads: {args.serve_streams} streams, the free engine stepping every "
        f"{args.step_ms} ms."
    ]
    markdown = worker_ab.to_markdown(
        points, f"`{name}` on `{label}`", notes, heading="raw's loop beside loads"
    )
    busy = busy_by_mode(made)
    markdown += "\n".join(busy_table(busy)) + "\n"
    data = {
        "model": model_dir.name,
        "device": label,
        "started_at": started,
        "settings": {
            "requests": args.requests,
            "modes": modes,
            "step_cpu": args.step_cpu,
            "load_cpus": cpus,
            "step_ms": args.step_ms,
            "serve_streams": args.serve_streams,
        },
        "busy": busy,
        "points": [pt.to_json() for pt in points],
    }
    stem = args.out / f"load-ab-{name}-{label}"
    for path in write_result(stem, data, markdown, {}):
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
