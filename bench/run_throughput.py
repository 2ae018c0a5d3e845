"""Entry point: lmx over HTTP against the raw BatchGenerator ceiling, in one run, per concurrency.

`python -m bench.run_throughput --preset tiny --out bench/results/`. Starts one `lmx serve`
(bench.server); for each concurrency, warms both sides up, then runs raw (bench.raw, in this
process) and lmx (bench.loadgen) on identical prompts in turns (`run_order`), and keeps the median
of the repeats. Each repeat also runs raw a second time: that A/A pair shows how far this machine
moves a pair of equal sides.
Writes
bench/results/throughput-<preset>-<device>.{json,md,png} via bench.report.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import gc
import importlib.metadata
import math
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import mlx.core as mx
from mlx_lm import load as mlx_load

import lmx
from bench.cpus import core_of, parse_cpus, pin_process, pin_stepper
from bench.engine_direct import load_engine, run_engine
from bench.loadgen import Target, auto_procs, run_load_procs
from bench.metrics import (
    PointStats,
    RequestTrace,
    median_stats,
    settled_steps,
    summarize,
    with_first_round,
    with_steps,
)
from bench.raw import run_raw
from bench.report import Point, Report
from bench.server import LmxServer
from bench.synth import DTYPES, PRESET_NAMES, ensure_model, printable_token_ids
from bench.workload import Workload, make_prompts
from lmx.reconciler.spec import parse_bytes
from lmx.runtime import steptrace
from lmx.runtime.mlx_engine import worker_environment, worker_tunables
from lmx.runtime.steptrace import Step, TraceReader

MODEL_ID = "bench-model"


def default_device_label() -> str:
    if mx.default_device().type == mx.cpu:
        return "cpu"
    name = str(mx.device_info().get("device_name") or "gpu")
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "gpu"


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@contextmanager
def py_spy(pid: int, out: Path | None) -> Iterator[None]:
    """Sample `pid` and its children (the server: the daemon and its model's worker) with py-spy,
    per thread, into `out` while the block runs, if asked."""
    exe = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if out is None or not Path(exe).exists():
        yield
        return
    argv = [exe, "record", "-p", str(pid), "-o", str(out), "--threads", "--subprocesses"]
    argv += ["--rate", "100"]
    argv += ["--nonblocking"]  # sampling must not pause the server it measures
    argv += ["--format", "speedscope" if out.suffix == ".json" else "flamegraph"]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    time.sleep(1.0)  # let it attach
    try:
        yield
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            _, err = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate(timeout=10)
        if not out.exists():
            log(f"  py-spy wrote no profile: {err.decode(errors='replace').strip()[-300:]}")


def _check(traces: list[RequestTrace], what: str) -> None:
    errors = sorted({t.error for t in traces if t.error})
    if errors:
        log(f"  {what}: {len(errors)} kinds of error, e.g. {errors[0]}")


@contextmanager
def stepping(args: argparse.Namespace, steps_dir: Path | None) -> Iterator[None]:
    """With `--step-cpu`, the side about to run steps its model on that CPU: an lmx worker, found
    by its step trace in `steps_dir` once it has written one (after the warm-up), or raw
    (`steps_dir` None): this process's main thread, which goes back to the other CPUs after."""
    if args.step_cpu is None:
        yield
        return
    if steps_dir is None:
        pin_stepper(os.getpid(), args.step_cpu, args.pinned)
        try:
            yield
        finally:
            pin_process(args.pinned)
        return
    traces = sorted(steps_dir.glob("steps-*.jsonl"), key=lambda p: p.stat().st_mtime)
    if traces:
        with contextlib.suppress(FileNotFoundError):  # that worker is gone
            pin_stepper(int(traces[-1].stem.removeprefix("steps-")), args.step_cpu, args.pinned)
    yield


def measure_raw(
    model: Any, w: Workload, prompts: Any, args: argparse.Namespace
) -> tuple[PointStats, list[Step]]:
    gc.collect()
    cpu0 = time.process_time()
    with stepping(args, None):
        traces, steps = run_raw(
            model, w, prompts, max_batch=args.max_batch, timeout_s=args.timeout_s
        )
    cpu = time.process_time() - cpu0
    mx.clear_cache()  # give the server the memory back (a GPU holds both copies of the model)
    _check(traces, "raw")
    stats = with_steps(summarize(traces, w.concurrency, server_cpu_s=cpu), steps)
    return with_first_round(stats, traces, [], steps), steps


def measure_engine(
    engine: Any, w: Workload, prompts: Any, args: argparse.Namespace
) -> tuple[PointStats, list[Step]]:
    gc.collect()
    cpu0, t0 = time.process_time(), time.perf_counter()
    with stepping(args, args.engine_steps_dir):
        traces = asyncio.run(run_engine(engine, w, prompts, timeout_s=args.timeout_s))
    cpu, t1 = time.process_time() - cpu0, time.perf_counter()
    _check(traces, "engine")
    steps = settled_steps(args.engine_trace, t0, t1)
    arrivals = args.engine_trace.arrivals(t0, t1)
    stats = with_steps(summarize(traces, w.concurrency, server_cpu_s=cpu), steps)
    return with_first_round(stats, traces, arrivals, steps), steps


def measure_lmx(
    server: LmxServer, w: Workload, prompts: Any, args: argparse.Namespace, profile: Path | None
) -> tuple[PointStats, list[Step]]:
    gc.collect()
    target = Target(server.base_url, MODEL_ID)
    assert server.process is not None
    with py_spy(server.process.pid, profile), stepping(args, server.steps_dir):
        srv0, totals0 = server.cpu_s(), server.totals()
        t0 = time.perf_counter()
        traces, cpu = run_load_procs(
            target,
            w,
            prompts,
            timeout_s=args.timeout_s,
            procs=args.client_procs or auto_procs(len(args.client_cpus), w.concurrency),
            cpus=args.client_cpus if args.cpus or args.step_cpu is not None else None,
        )
        t1 = time.perf_counter()
        srv = server.cpu_s() - srv0
    _check(traces, "lmx")
    totals = server.totals()
    steps = settled_steps(server.trace, t0, t1)
    arrivals = server.trace.arrivals(t0, t1)  # written by the time the steps are

    def latency_ms(name: str) -> float:
        count = f"lmx_{name}_seconds_count"
        n = totals.get(count, 0.0) - totals0.get(count, 0.0)
        total = f"lmx_{name}_seconds_sum"
        return (totals.get(total, 0.0) - totals0.get(total, 0.0)) / n * 1e3 if n else math.nan

    stats = replace(
        summarize(traces, w.concurrency, client_cpu_s=cpu, server_cpu_s=srv),
        server_ttft_ms=latency_ms("time_to_first_token"),
        queue_ms=latency_ms("request_queue"),
        prefill_ms=latency_ms("request_prefill"),
    )
    return with_first_round(with_steps(stats, steps), traces, arrivals, steps), steps


def run_order(sides: Sequence[str], rep: int) -> list[str]:
    """The order of the sides' runs in repeat `rep`: turned by one every other repeat and
    reversed in every second, so that each side takes each place, and follows each other side,
    equally often (every 2 repeats for two sides, every 6 for three). Until 2026-12-03 raw was
    always in the middle of three, beside both of the runs it was compared with; on the lent
    GPU its second run ("again") then scored 0.95 of it at 1 stream, and so might lmx have."""
    k = rep // 2 % len(sides)
    turned = [*sides[k:], *sides[:k]]
    return turned[::-1] if rep % 2 else turned


def measure_point(
    model: Any, engine: Any, srv: LmxServer, c: int, ids: list[int], args: argparse.Namespace
) -> Point:
    w = Workload.sized(c, args.prompt_tokens, args.output_tokens, args.min_requests, args.rounds)
    # "again": raw's second run, the A/A test.
    sides = (["again"] if args.again else []) + ["raw", "lmx"]
    sides += ["engine"] if engine is not None else []
    runs: dict[str, list[PointStats]] = {side: [] for side in sides}
    steps: dict[str, tuple[Step, ...]] = {}  # each side's last run, step by step

    def measure(
        side: str, w: Workload, prompts: Any, profile: Path | None = None
    ) -> tuple[PointStats, list[Step]]:
        if side in ("raw", "again"):
            return measure_raw(model, w, prompts, args)
        if side == "engine":
            return measure_engine(engine, w, prompts, args)
        return measure_lmx(srv, w, prompts, args, profile)

    # Warm-up: a whole run on each side, on prompts not used below. MLX compiles kernels for
    # a new shape on first use; one request per stream leaves the refills' batch shapes
    # unseen, and a stall of a second inside a measured run of a few decides its result.
    warm = w
    for k, side in enumerate(s for s in sides if s != "again"):  # raw's warm-up is again's
        measure(side, warm, make_prompts(warm, ids, seed=10_000 * (k + 1) + c))
    for rep in range(args.repeats):
        prompts = make_prompts(w, ids, seed=1_000 * c + rep)
        profile = None
        if args.py_spy and rep == 0:
            profile = args.out / f"profile-{args.preset}-{args.device_label}-c{c}.svg"
        for side in run_order(sides, rep):
            stats, side_steps = measure(side, w, prompts, profile)
            runs[side].append(stats)
            if side != "again":
                steps[side] = tuple(side_steps)
            log(f"  c={c} rep={rep} {side}: {stats.output_tok_s:.1f} tok/s")
    return Point(
        c,
        median_stats(runs["raw"]),
        median_stats(runs["lmx"]),
        tuple(runs["raw"]),
        tuple(runs["lmx"]),
        median_stats(runs["engine"]) if engine is not None else None,
        tuple(runs.get("engine", ())),
        steps,
        tuple(runs.get("again", ())),
    )


def raw_malloc_environment(choice: str, environ: Mapping[str, str]) -> dict[str, str] | None:
    """The environment to start this run again in for `--raw-malloc`, None where `environ` will
    do: with "lmx", raw's loop (and the clients, and lmx's daemon) run with the glibc malloc
    settings lmx gives its workers; with "default", with whatever `environ` has."""
    if choice == "default":
        return None
    wanted = worker_environment(environ)
    return None if wanted["GLIBC_TUNABLES"] == environ.get("GLIBC_TUNABLES") else wanted


def glibc_tunables(environ: Mapping[str, str]) -> dict[str, str] | None:
    """GLIBC_TUNABLES of this process (raw's loop) and of lmx's workers, where glibc reads them."""
    if platform.libc_ver()[0] != "glibc":
        return None
    return {"raw": environ.get("GLIBC_TUNABLES", ""), "workers": worker_tunables(environ)}


def _cpu_list(cpus: frozenset[int]) -> str:
    return ",".join(map(str, sorted(cpus)))


def context_length(args: argparse.Namespace) -> int:
    # Room for the prompt and the output, rounded up to a multiple of 256.
    need: int = args.prompt_tokens + args.output_tokens + 64
    return -(-need // 256) * 256


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="lmx over HTTP vs the raw BatchGenerator ceiling.")
    p.add_argument("--preset", choices=PRESET_NAMES, default="tiny")
    p.add_argument("--out", type=Path, default=Path("bench/results"))
    p.add_argument("--concurrency", default="1,2,4,8,16,32")
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--output-tokens", type=int, default=64)
    p.add_argument("--min-requests", type=int, default=16, help="requests per run, at least")
    p.add_argument(
        "--rounds", type=int, default=2, help="requests per stream, at least (2 or more)"
    )
    p.add_argument(
        "--client-procs",
        type=int,
        default=0,
        help="processes lmx's client streams are split over (0: one per two cores)",
    )
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--max-batch", type=int, default=32)
    p.add_argument("--dtype", choices=list(DTYPES), default="bfloat16", help="synthetic weights")
    p.add_argument("--models-dir", type=Path, default=Path("bench/.models"))
    p.add_argument("--device-label", help="names the result files (default: from MLX)")
    p.add_argument("--timeout-s", type=float, default=600.0, help="per measured run")
    p.add_argument(
        "--py-spy", action="store_true", help="flame graph of the server and its worker per point"
    )
    p.add_argument(
        "--engine-layer",
        action="store_true",
        help="also measure lmx's engine without HTTP (a second copy of the model)",
    )
    p.add_argument(
        "--no-again",
        dest="again",
        action="store_false",
        help="leave out raw's second run per repeat (the A/A test of the pairing)",
    )
    p.add_argument(
        "--cpus",
        help="CPUs (e.g. 2-5) for raw and lmx's daemon and worker; lmx's clients get the others",
    )
    p.add_argument(
        "--step-cpu",
        type=int,
        help="a CPU for the thread of each side that steps the model; nothing else runs on its core",
    )
    p.add_argument(
        "--prompt-cache",
        metavar="SIZE",
        help="lmx's prompt cache budget (e.g. 256MiB; 0 turns it off; default: lmx's default)",
    )
    p.add_argument(
        "--raw-malloc",
        choices=("default", "lmx"),
        default="default",
        help="glibc malloc settings for raw's loop: as the environment has them, or as lmx's"
        " workers run (this process starts again with them, and so its clients and lmx's daemon)",
    )
    p.add_argument("--note", action="append", default=[], help="a line for the report")
    args = p.parse_args(argv)
    args.prompt_cache_bytes = None
    if args.prompt_cache is not None:
        try:
            args.prompt_cache_bytes = parse_bytes(args.prompt_cache)
        except ValueError as e:
            p.error(f"--prompt-cache: {e}")
    available = frozenset(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    args.client_cpus = available or frozenset(range(os.cpu_count() or 1))
    if args.cpus:
        if available is None:
            p.error("--cpus needs CPU affinity, which this platform does not have (Linux has)")
        try:
            args.cpus = parse_cpus(args.cpus)
        except ValueError as e:
            p.error(f"--cpus: {e}")
        if not args.cpus <= available:
            p.error(f"--cpus: {_cpu_list(args.cpus - available)} not among this process's CPUs")
        args.client_cpus = available - args.cpus
        if not args.client_cpus:
            p.error("--cpus: leaves no CPU for lmx's clients")
    # Raw and lmx's daemon, and with --step-cpu the threads of both sides that do not step.
    args.pinned = args.cpus or available
    if args.step_cpu is not None:
        if available is None:
            p.error("--step-cpu needs CPU affinity, which this platform does not have (Linux has)")
        if args.step_cpu not in args.pinned:
            where = "--cpus" if args.cpus else "this process's CPUs"
            p.error(f"--step-cpu: {args.step_cpu} is not among {where}")
        core = core_of(args.step_cpu)
        args.pinned -= core
        args.client_cpus -= core
        if not args.pinned or not args.client_cpus:
            p.error(f"--step-cpu: core {_cpu_list(core)} leaves no CPU for the rest")
    args.device_label = args.device_label or default_device_label()
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if (environ := raw_malloc_environment(args.raw_malloc, os.environ)) is not None:
        again = sys.argv[1:] if argv is None else argv
        os.execve(sys.executable, [sys.executable, "-m", "bench.run_throughput", *again], environ)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.cpus or args.step_cpu is not None:
        pin_process(args.pinned)  # before the server starts: its daemon and worker inherit it
    t0 = time.monotonic()
    model_dir = ensure_model(args.preset, args.models_dir, args.dtype)
    log(f"model {model_dir} (built or found in {time.monotonic() - t0:.1f}s)")
    model = mlx_load(str(model_dir))[0]
    ids = printable_token_ids(model_dir)
    engine = None
    if args.engine_layer:
        # The engine's worker logs its steps here (it inherits the environment).
        args.engine_steps_dir = Path(tempfile.mkdtemp(prefix="lmx-bench-engine-steps-"))
        os.environ[steptrace.ENV] = str(args.engine_steps_dir)
        args.engine_trace = TraceReader(args.engine_steps_dir)
        engine = load_engine(
            model_dir, max_batch=args.max_batch, context_length=context_length(args)
        )
    report = Report(
        preset=args.preset,
        device=args.device_label,
        settings={
            "prompt_tokens": args.prompt_tokens,
            "output_tokens": args.output_tokens,
            "max_batch": args.max_batch,
            "repeats": args.repeats,
            "min_requests": args.min_requests,
            "rounds": args.rounds,
            "client_procs": args.client_procs or "one per two cores",
            "dtype": "float32" if args.preset == "tiny" else args.dtype,
            "api": "/v1/completions, token-id prompts, stream, ignore_eos + min_tokens",
            "mlx_device": str(mx.default_device()),
            "cpu_count": os.cpu_count(),
            "cpus": (
                f"{_cpu_list(args.pinned)}, clients {_cpu_list(args.client_cpus)}"
                if args.cpus or args.step_cpu is not None
                else "any"
            ),
            "step_cpu": args.step_cpu,
            "prompt_cache_bytes": args.prompt_cache_bytes,
            "glibc_tunables": glibc_tunables(os.environ),
        },
        versions={
            "lmx": lmx.__version__,
            "mlx": importlib.metadata.version("mlx"),
            "mlx-lm": importlib.metadata.version("mlx-lm"),
            "python": platform.python_version(),
        },
        started_at=dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        notes=list(args.note),
    )
    # One server for the whole run, as the raw side's model stays loaded in this process: each
    # side keeps what MLX compiled for the batch shapes of earlier points, as a daemon that has
    # been serving for a while has.
    with LmxServer(
        MODEL_ID,
        model_dir,
        max_batch=args.max_batch,
        context_length=context_length(args),
        prompt_cache_bytes=args.prompt_cache_bytes,
    ) as srv:
        for c in (int(x) for x in args.concurrency.split(",")):
            log(f"concurrency {c}")
            point = measure_point(model, engine, srv, c, ids, args)
            report.points.append(point)
            report.duration_s = time.monotonic() - t0
            report.write(args.out)  # after every point: a crash keeps what was measured
            log(
                f"  median raw {point.raw.output_tok_s:.1f} tok/s,"
                f" lmx {point.lmx.output_tok_s:.1f} tok/s, ratio {point.ratio:.2f}"
            )
    if engine is not None:
        engine.unload()
        shutil.rmtree(args.engine_steps_dir, ignore_errors=True)
    for path in report.write(args.out):
        log(f"wrote {path}")
    print(report.to_markdown())
    return 0


if __name__ == "__main__":
    sys.exit(main())
