"""The middle layer: lmx's MlxEngine driven through its async `stream`, no HTTP.

Between the raw BatchGenerator and lmx over HTTP, this isolates the engine's own cost (worker
process, messages, detokenizer, stop matching) from the API's. Used by run_throughput when given
`--engine-layer`; it loads a second copy of the model (in a worker process of its own).
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from bench.metrics import RequestTrace
from bench.workload import Prompts, Workload
from lmx.runtime.engine import GenerationRequest, LoadConfig, SamplingParams
from lmx.runtime.mlx_engine import MlxEngine


def load_engine(model_dir: Path, *, max_batch: int, context_length: int) -> MlxEngine:
    """A loaded engine as `lmx serve` would configure it for this model (blocking)."""
    engine = MlxEngine(
        LoadConfig(
            model_id="bench-engine",
            path=model_dir,
            max_batch=max_batch,
            context_length=context_length,
        )
    )
    engine.load()
    return engine


async def _one(engine: MlxEngine, prompt: list[int], output_tokens: int) -> RequestTrace:
    trace = RequestTrace(sent_s=time.perf_counter())
    params = SamplingParams(
        max_tokens=output_tokens, temperature=0.0, min_tokens=output_tokens, ignore_eos=True
    )
    try:
        async for delta in engine.stream(GenerationRequest(prompt_tokens=prompt, params=params)):
            if delta.text:
                trace.chunk_s.append(time.perf_counter())
            if delta.queue_s is not None:
                trace.queue_s, trace.prefill_s = delta.queue_s, delta.prefill_s
            if delta.finish_reason is not None:
                trace.output_tokens = delta.completion_tokens
                trace.error = delta.error
    except Exception as exc:  # one request's failure is reported in its trace, as over HTTP
        trace.error = f"{type(exc).__name__}: {exc}"
    return trace


async def run_engine(
    engine: MlxEngine, workload: Workload, prompts: Prompts, *, timeout_s: float
) -> list[RequestTrace]:
    """Closed-loop streams as bench.loadgen runs them, minus HTTP. Raises TimeoutError."""

    async def stream(s: int) -> list[RequestTrace]:
        return [await _one(engine, p, workload.output_tokens) for p in prompts[s]]

    async with asyncio.timeout(timeout_s):
        per_stream = await asyncio.gather(*(stream(s) for s in range(workload.concurrency)))
    return [t for traces in per_stream for t in traces]
