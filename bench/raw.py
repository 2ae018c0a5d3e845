"""The ceiling: mlx-lm's BatchGenerator driven directly in-process, no HTTP, no lmx.

`run_raw` replays a workload's closed-loop streams with `insert`/`next`: greedy, EOS ignored,
the batch sizes lmx's engine uses. Called by bench.run_throughput; also a small CLI.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import mlx.core as mx
from mlx_lm import load as mlx_load
from mlx_lm.generate import BatchGenerator

from bench.metrics import RequestTrace, summarize
from bench.synth import printable_token_ids
from bench.workload import Prompts, Workload, make_prompts
from lmx.runtime.mlx_worker import prefill_group
from lmx.runtime.steptrace import Step, step_of, switches, switches_between

# As lmx's worker configures BatchGenerator for a model with `max_batch`.
PREFILL_STEP = 2048
_streams: dict[str, Any] = {}


def _stream() -> Any:
    # One stream per process: on the CPU backend each new stream starts a thread that stays.
    key = str(mx.default_device())
    if key not in _streams:
        _streams[key] = mx.new_stream(mx.default_device())
    return _streams[key]


def batch_generator(model: Any, max_batch: int, prompt_tokens: int) -> Any:
    """A BatchGenerator as lmx's worker configures one for a model with `max_batch`, its prefill
    group the one the worker picks when prompts of `prompt_tokens` wait."""
    chunk = min(prompt_tokens, PREFILL_STEP)
    return BatchGenerator(
        model,
        completion_batch_size=max_batch,
        prefill_batch_size=prefill_group([chunk] * max_batch, PREFILL_STEP, max_batch),
        prefill_step_size=PREFILL_STEP,
        stream=_stream(),
    )


def run_raw(
    model: Any, workload: Workload, prompts: Prompts, *, max_batch: int, timeout_s: float
) -> tuple[list[RequestTrace], list[Step]]:
    """Run the workload to completion (or `timeout_s`): one trace per request, in stream order,
    and one Step per BatchGenerator step (as lmx's worker logs them).

    Each stream inserts its next request as soon as its previous one finished, like an HTTP
    client that sends again on [DONE]. Requests not finished at the deadline carry an error.
    """
    gen = batch_generator(model, max_batch, workload.prompt_tokens)
    traces: list[list[RequestTrace]] = [[] for _ in range(workload.concurrency)]
    live: dict[int, tuple[int, RequestTrace]] = {}

    def submit(stream: int) -> None:
        prompt = prompts[stream][len(traces[stream])]
        trace = RequestTrace(sent_s=time.perf_counter())
        (uid,) = gen.insert([prompt], max_tokens=[workload.output_tokens])
        traces[stream].append(trace)
        live[uid] = (stream, trace)

    # Prefill chunks plus decode steps, with slack: a bound on the loop besides the clock.
    max_steps = 4 * workload.requests * (workload.output_tokens + 2) + 100
    deadline = time.perf_counter() + timeout_s
    steps: list[Step] = []
    try:
        for s in range(workload.concurrency):
            submit(s)
        for _ in range(max_steps):
            if not live or time.perf_counter() > deadline:
                break
            sw0 = switches()  # all read as lmx's worker reads them
            t0, c0 = time.perf_counter(), time.thread_time()
            prompt_work, responses = gen.next()
            c1, now = time.thread_time(), time.perf_counter()
            sw1 = switches()
            for r in responses:
                stream, trace = live[r.uid]
                trace.chunk_s.append(now)
                trace.output_tokens += 1
                if r.finish_reason is not None:
                    del live[r.uid]
                    if len(traces[stream]) < workload.requests_per_stream:
                        submit(stream)
            after_ms = (time.perf_counter() - now) * 1e3
            cpu_ms = (c1 - c0) * 1e3
            switched = switches_between(sw0, sw1)
            steps.append(step_of(t0, now, prompt_work, responses, after_ms, 0.0, cpu_ms, switched))
    finally:
        gen.close()
    for _, trace in live.values():
        trace.error = "unfinished at the deadline"
    return [t for stream in traces for t in stream], steps


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Measure mlx-lm's BatchGenerator without lmx.")
    p.add_argument("--model", type=Path, required=True, help="a model directory")
    p.add_argument("--concurrency", default="1,2,4,8,16,32")
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--output-tokens", type=int, default=64)
    p.add_argument("--max-batch", type=int, default=32)
    p.add_argument("--timeout-s", type=float, default=600.0)
    args = p.parse_args(argv)
    model, _ = mlx_load(str(args.model))[:2]
    ids = printable_token_ids(args.model)
    for c in (int(x) for x in args.concurrency.split(",")):
        w = Workload.sized(c, args.prompt_tokens, args.output_tokens)
        run_raw(
            model, w, make_prompts(w, ids, seed=-c % 2**32), max_batch=args.max_batch, timeout_s=60
        )
        traces, _ = run_raw(
            model,
            w,
            make_prompts(w, ids, seed=c),
            max_batch=args.max_batch,
            timeout_s=args.timeout_s,
        )
        print(summarize(traces, c))


if __name__ == "__main__":
    main()
