"""lmx's HTTP/SSE cost per token, alone: the real app (`create_app`) over uvicorn, a free engine.

`ZeroEngine` implements the Engine protocol with no model: a worker thread hands one delta to
every live sequence each `step_ms`, through `call_soon_threadsafe` as MlxEngine does. Server CPU
per token then is what lmx's API layer costs. `python -m bench.http_overhead`; it runs itself as
the server (`--serve PORT`) in a subprocess and drives it with bench.loadgen.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import struct
import subprocess
import sys
import threading
import time
from collections.abc import AsyncGenerator, Callable, Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

import httpx
import psutil
import uvicorn

from bench.loadgen import Target, run_load
from bench.metrics import summarize
from bench.server import free_port
from bench.workload import Workload, make_prompts
from lmx.api.app import create_app
from lmx.api.deps import AppDeps
from lmx.logs import configure
from lmx.reconciler.status import Listed
from lmx.runtime.engine import (
    Delta,
    Embeddings,
    EngineState,
    EngineStats,
    GenerationRequest,
    LoadConfig,
)
from lmx.runtime.parsers import Thinking
from lmx.runtime.registry import EngineRegistry
from lmx.runtime.sampling import SamplingDefaults

MODEL_ID = "zero"
_SERVER_WAIT_S = 60.0  # for `serve` to answer


class ZeroTokenizer:
    """Every id decodes to "!"; `reasoning` as the synthetic models' tokenizer (it has <think>),
    its tags ids 5 and 6, which no prompt of it holds (every prompt token is 7)."""

    eos_token_ids: frozenset[int] = frozenset({0})
    tool_parser: str | None = None
    marker_ids: Mapping[str, int] = {}
    thinking: Thinking | None = ((5,), 6)

    def __init__(self, reasoning: bool) -> None:
        self.reasoning = reasoning

    def encode(self, text: str) -> list[int]:
        return [7] * max(1, len(text.split()))

    def decode(self, ids: Sequence[int]) -> str:
        return "!" * len(ids)

    def apply_chat_template(self, messages: Sequence[Mapping[str, Any]], **_: Any) -> list[int]:
        return [7] * 8


class ZeroEngine:
    """The Engine protocol with no model behind it; one step every `step_s` on its own thread."""

    def __init__(self, config: LoadConfig, step_s: float, reasoning: bool) -> None:
        self.config = config
        self.on_failure: Callable[[str], None] = lambda reason: None  # it never fails
        self.tokenizer = ZeroTokenizer(reasoning)
        self.context_length = 4096
        self.pid: int | None = None  # runs in the server's process
        self.sampling_defaults = SamplingDefaults()
        self._state = EngineState.UNLOADED
        self._step_s = step_s
        self._live: dict[
            int, tuple[asyncio.AbstractEventLoop, asyncio.Queue[Delta], list[int]]
        ] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._next_id = 0

    @property
    def state(self) -> EngineState:
        return self._state

    def load(self) -> None:
        threading.Thread(target=self._run, name="zero-engine", daemon=True).start()
        self._state = EngineState.READY

    def unload(self) -> None:
        self._stop.set()
        self._state = EngineState.UNLOADED

    def stats(self) -> EngineStats:
        return EngineStats(len(self._live), 0, len(self._live), 0, 0, 0, 0)

    def resident_bytes(self) -> int:
        return 0

    def _run(self) -> None:
        while not self._stop.wait(self._step_s):
            with self._lock:
                live = list(self._live.items())
            batches: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue[Delta], Delta]]] = {}
            for key, (loop, queue, state) in live:
                state[0] += 1  # generated, max_tokens, prompt tokens
                finish = "length" if state[0] >= state[1] else None
                if finish is not None:
                    with self._lock:
                        self._live.pop(key, None)
                delta = Delta("!", (7,), (), finish, state[2], state[0])
                batches.setdefault(loop, []).append((queue, delta))
            for loop, items in batches.items():
                loop.call_soon_threadsafe(_put_all, items)

    def hold(self, request_id: str, places: int) -> contextlib.nullcontext[None]:
        return contextlib.nullcontext()  # no queue to hold places in

    async def stream(self, request: GenerationRequest) -> AsyncGenerator[Delta, None]:
        queue: asyncio.Queue[Delta] = asyncio.Queue()
        with self._lock:
            key, self._next_id = self._next_id, self._next_id + 1
            state = [0, request.params.max_tokens, len(request.prompt_tokens)]
            self._live[key] = (asyncio.get_running_loop(), queue, state)
        try:
            while True:
                delta = await queue.get()
                yield delta
                if delta.finish_reason is not None:
                    return
        finally:
            with self._lock:
                self._live.pop(key, None)

    async def embed(self, inputs: Sequence[Sequence[int]], request_id: str = "") -> Embeddings:
        """Every input the same vector of length 1, at once: no model, as for text."""
        one = struct.pack("<f", 1.0)
        return Embeddings(one * len(inputs), len(inputs), 1, sum(len(r) for r in inputs))


def _put_all(items: list[tuple[asyncio.Queue[Delta], Delta]]) -> None:
    for queue, delta in items:
        queue.put_nowait(delta)


class _Models:
    def __init__(self, registry: EngineRegistry) -> None:
        self.registry = registry

    def servable(self) -> list[str]:
        return self.registry.ids()

    def listed(self) -> list[Listed]:
        return [Listed(m, m, "zero", Path(), "loaded", 4096) for m in self.registry.ids()]

    def status(self) -> dict[str, Any]:
        return {"config": {"valid": True}, "models": {}}

    async def ensure_ready(self, name: str) -> str:
        return name

    def sampling(self, model_id: str) -> SamplingDefaults:
        return SamplingDefaults()


def serve(port: int, step_s: float, reasoning: bool) -> None:
    """The server side: lmx's app and uvicorn configured as lmx.daemon does (its event loop and
    its JSON logs too)."""
    configure("info", json=True)
    registry = EngineRegistry(lambda config: ZeroEngine(config, step_s, reasoning))

    async def load() -> None:
        config = LoadConfig(model_id=MODEL_ID, path=Path("/nonexistent"), max_batch=1024)
        await registry.load(config)

    app = create_app(AppDeps(registry=registry, models=_Models(registry)), on_startup=load)
    config = uvicorn.Config(
        app, host="127.0.0.1", port=port, log_config=None, access_log=False, lifespan="on"
    )
    uvicorn.Server(config).run()


def start_server(
    step_ms: float, *, reasoning: bool = True, cpus: Collection[int] | None = None
) -> tuple[subprocess.Popen[bytes], str]:
    """`serve` in a process of its own on a free port (with `cpus`, on those CPUs), once it
    answers: the process and its /v1 URL. RuntimeError, the process ended, if it exits or does
    not answer within _SERVER_WAIT_S."""
    port = free_port()
    argv = [sys.executable, "-m", "bench.http_overhead", "--serve", str(port)]
    argv += ["--step-ms", str(step_ms)] + ([] if reasoning else ["--no-reasoning"])
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        if cpus is not None:
            os.sched_setaffinity(proc.pid, set(cpus))
        url = f"http://127.0.0.1:{port}/v1"
        deadline = time.monotonic() + _SERVER_WAIT_S
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"the free engine's server ended (exit code {proc.returncode})")
            try:
                if httpx.get(f"{url}/models", timeout=2.0).status_code == 200:
                    return proc, url
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"the free engine's server did not answer in {_SERVER_WAIT_S} s")
            time.sleep(0.2)
    except BaseException:
        proc.kill()
        proc.wait()
        raise


def measure(args: argparse.Namespace) -> None:
    proc, url = start_server(args.step_ms, reasoning=args.reasoning)
    try:
        server = psutil.Process(proc.pid)
        target = Target(url, MODEL_ID)
        print(
            f"zero-cost engine, one step every {args.step_ms} ms; {args.output_tokens} tokens each"
        )
        for c in (int(x) for x in args.concurrency.split(",")):
            w = Workload.sized(c, 16, args.output_tokens, args.min_requests)
            asyncio.run(
                run_load(target, w, make_prompts(w, range(8, 64), seed=10_000 + c), timeout_s=300)
            )
            cpu0, srv = time.process_time(), server.cpu_times()
            traces = asyncio.run(
                run_load(target, w, make_prompts(w, range(8, 64), seed=c), timeout_s=300)
            )
            srv2 = server.cpu_times()
            stats = summarize(traces, c)
            tokens = max(stats.output_tokens, 1)
            server_us = 1e6 * (srv2.user + srv2.system - srv.user - srv.system) / tokens
            client_us = 1e6 * (time.process_time() - cpu0) / tokens
            ideal = c * 1e3 / args.step_ms
            print(
                f"c={c:<4} server {server_us:6.0f} us/token  client {client_us:6.0f} us/token  "
                f"{stats.output_tok_s:8.0f} tok/s of {ideal:.0f} paced  "
                f"itl p50 {stats.itl_p50_ms:6.2f} ms p99 {stats.itl_p99_ms:7.2f}  errors {stats.errors}"
            )
    finally:
        proc.terminate()
        proc.wait(30)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="lmx's HTTP/SSE cost per token with a free engine.")
    p.add_argument("--concurrency", default="1,8,32")
    p.add_argument("--step-ms", type=float, default=10.0, help="the fake engine's step time")
    p.add_argument("--output-tokens", type=int, default=64)
    p.add_argument("--min-requests", type=int, default=64)
    p.add_argument("--no-reasoning", dest="reasoning", action="store_false")
    p.add_argument("--serve", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.serve:
        serve(args.serve, args.step_ms / 1e3, args.reasoning)
    else:
        measure(args)


if __name__ == "__main__":
    main()
