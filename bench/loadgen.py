"""An HTTP load generator for any OpenAI-compatible server: N closed-loop streaming clients.

Sends /v1/completions (token-id prompts: exact length) or /v1/chat/completions over httpx with
SSE streaming, EOS ignored via the vLLM extensions `ignore_eos` and `min_tokens`, and records a
RequestTrace per request; the streams may be split over several client processes
(`run_load_procs`). Called by bench.run_throughput; standalone: `python -m bench.loadgen`.
Every loop is bounded in count and time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, replace
from typing import Any, Literal

import httpx

from bench.metrics import RequestTrace, summarize
from bench.workload import Prompts, Workload, make_prompts

Api = Literal["completions", "chat"]
# Words that common BPE tokenizers encode as one token each (chat prompts are text).
_WORDS = ("the", "of", "and", "to", "in", "is", "that", "for", "it", "as", "was", "on")


@dataclass(frozen=True)
class Target:
    base_url: str  # e.g. http://127.0.0.1:1234/v1
    model: str
    api: Api = "completions"
    api_key: str | None = None


def request_body(target: Target, prompt: list[int], output_tokens: int) -> dict[str, Any]:
    """A greedy streaming request for exactly `output_tokens` tokens, whatever the model says."""
    body: dict[str, Any] = {
        "model": target.model,
        "max_tokens": output_tokens,
        "min_tokens": output_tokens,
        "ignore_eos": True,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if target.api == "chat":
        # Approximate length: the server's tokenizer and chat template decide the exact count.
        text = " ".join(_WORDS[t % len(_WORDS)] for t in prompt)
        body["messages"] = [{"role": "user", "content": text}]
    else:
        body["prompt"] = prompt
    return body


def _chunk_text(choice: dict[str, Any]) -> str:
    if "text" in choice:
        return str(choice["text"] or "")
    delta = choice.get("delta") or {}
    return str(delta.get("content") or "") + str(delta.get("reasoning_content") or "")


async def one_request(
    client: httpx.AsyncClient, target: Target, prompt: list[int], output_tokens: int
) -> RequestTrace:
    """Send one streaming request and time each chunk that carries text. Never raises."""
    path = "/chat/completions" if target.api == "chat" else "/completions"
    trace = RequestTrace(sent_s=time.perf_counter())
    usage_tokens: int | None = None
    max_lines = 4 * output_tokens + 64  # data lines and blank separators, with slack

    async def on_event(name: str, _info: dict[str, Any]) -> None:  # httpcore's trace extension
        if name == "http11.send_request_body.complete":
            trace.written_s = time.perf_counter()

    try:
        async with client.stream(
            "POST",
            path,
            json=request_body(target, prompt, output_tokens),
            extensions={"trace": on_event},
        ) as resp:
            if resp.status_code != 200:
                body = (await resp.aread())[:300].decode(errors="replace")
                trace.error = f"HTTP {resp.status_code}: {body}"
                return trace
            lines = 0
            async for line in resp.aiter_lines():
                now = time.perf_counter()
                lines += 1
                if lines > max_lines:
                    trace.error = f"more than {max_lines} SSE lines"
                    break
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    # Read on to the end of the body, as the openai SDK does, so that the
                    # connection goes back to the pool instead of being closed.
                    continue
                event = json.loads(data)
                if "error" in event:
                    trace.error = str(event["error"].get("message", event["error"]))
                    break
                if any(_chunk_text(c) for c in event.get("choices") or ()):
                    trace.chunk_s.append(now)
                if event.get("usage"):
                    usage_tokens = int(event["usage"]["completion_tokens"])
    except (httpx.HTTPError, json.JSONDecodeError, KeyError, ValueError) as exc:
        trace.error = f"{type(exc).__name__}: {exc}"
    # Without usage (a server that ignores include_usage), count text chunks as tokens.
    trace.output_tokens = usage_tokens if usage_tokens is not None else len(trace.chunk_s)
    if trace.error is None and trace.output_tokens != output_tokens:
        trace.error = f"got {trace.output_tokens} tokens, asked for {output_tokens}"
    return trace


async def run_load(
    target: Target,
    workload: Workload,
    prompts: Prompts,
    *,
    timeout_s: float,
    ready: Callable[[], Awaitable[None]] | None = None,
) -> list[RequestTrace]:
    """Run `workload.concurrency` clients, each sending its prompts in turn; traces in order.
    `ready`, if given, is awaited once the client's connections are open, before the first
    request.

    Raises TimeoutError if the whole point takes longer than `timeout_s`.
    """
    headers = {"Authorization": f"Bearer {target.api_key}"} if target.api_key else {}
    limits = httpx.Limits(
        max_connections=workload.concurrency + 4, max_keepalive_connections=workload.concurrency + 4
    )
    timeout = httpx.Timeout(timeout_s, connect=30.0)

    async with httpx.AsyncClient(
        base_url=target.base_url, headers=headers, limits=limits, timeout=timeout
    ) as client:

        async def stream(s: int) -> list[RequestTrace]:
            return [
                await one_request(client, target, p, workload.output_tokens) for p in prompts[s]
            ]

        # Each stream's connection open before the clock starts, as a long-running client's is.
        await asyncio.gather(*(client.get("/models") for _ in range(workload.concurrency)))
        if ready is not None:
            await ready()
        async with asyncio.timeout(timeout_s):
            per_stream = await asyncio.gather(*(stream(s) for s in range(workload.concurrency)))
    return [t for traces in per_stream for t in traces]


def auto_procs(concurrency: int) -> int:
    """Client processes for `concurrency` streams: one per two cores, at most one per stream."""
    return max(1, min(concurrency, (os.cpu_count() or 1) // 2))


def run_load_procs(
    target: Target, workload: Workload, prompts: Prompts, *, timeout_s: float, procs: int
) -> tuple[list[RequestTrace], float]:
    """`run_load` with the streams split over `procs` client processes that start together: the
    traces in stream order and the CPU seconds the clients used.

    One Python process parsing every stream's chunks and sending every next request spends ms of
    CPU per request (httpx; 13 ms for a request of 4 tokens on a 2-core machine): at 32 streams a
    round's requests would leave it over tens of ms, which measures the client. Clients in
    processes of their own, as a server's real clients are, send theirs within a few ms. Raises
    TimeoutError as `run_load` does.
    """
    c = workload.concurrency
    procs = max(1, min(procs, c))
    if procs == 1:
        cpu0 = time.process_time()
        traces = asyncio.run(run_load(target, workload, prompts, timeout_s=timeout_s))
        return traces, time.process_time() - cpu0
    bounds = [(i * c // procs, (i + 1) * c // procs) for i in range(procs)]
    argv = [sys.executable, "-m", "bench.loadgen", "--shard"]
    children = [
        subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        for _ in bounds
    ]
    try:
        for child, (lo, hi) in zip(children, bounds, strict=True):
            spec = {
                "target": asdict(target),
                "workload": asdict(replace(workload, concurrency=hi - lo)),
                "prompts": prompts[lo:hi],
                "timeout_s": timeout_s,
            }
            _tell(child, json.dumps(spec))
        for child in children:  # every client built and waiting
            if _hear(child) != "ready":
                raise RuntimeError("a load generator process failed to start")
        for child in children:
            _tell(child, "go")
        merged: list[RequestTrace] = []
        cpu_s = 0.0
        for child in children:
            out, _ = child.communicate(timeout=timeout_s + 60)
            result = json.loads(out)
            if result.get("timeout"):
                raise TimeoutError(f"the point took longer than {timeout_s} s")
            merged += [RequestTrace(**t) for t in result["traces"]]
            cpu_s += result["cpu_s"]
        return merged, cpu_s
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
                child.wait()


def _tell(child: subprocess.Popen[str], line: str) -> None:
    assert child.stdin is not None
    child.stdin.write(line + "\n")
    child.stdin.flush()


def _hear(child: subprocess.Popen[str]) -> str:
    assert child.stdout is not None
    return child.stdout.readline().strip()


def _shard() -> None:
    """One client process of `run_load_procs`: its streams as a JSON line on stdin, "ready" on
    stdout once its client is built, then "go" on stdin; prints its traces as JSON."""
    spec = json.loads(sys.stdin.readline())
    cpu0 = 0.0

    async def ready() -> None:
        nonlocal cpu0
        print("ready", flush=True)
        await asyncio.to_thread(sys.stdin.readline)
        cpu0 = time.process_time()

    try:
        traces = asyncio.run(
            run_load(
                Target(**spec["target"]),
                Workload(**spec["workload"]),
                spec["prompts"],
                timeout_s=spec["timeout_s"],
                ready=ready,
            )
        )
    except TimeoutError:
        print(json.dumps({"timeout": True}))
        return
    cpu_s = time.process_time() - cpu0
    print(json.dumps({"cpu_s": cpu_s, "traces": [asdict(t) for t in traces]}))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Streaming load against an OpenAI-compatible server.")
    p.add_argument("--url", default="http://127.0.0.1:1234/v1", help="base URL, ending in /v1")
    p.add_argument("--model", help="the model to ask for (required)")
    p.add_argument("--api", choices=["completions", "chat"], default="completions")
    p.add_argument("--api-key")
    p.add_argument("--concurrency", default="1,2,4,8,16,32", help="comma-separated stream counts")
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--output-tokens", type=int, default=64)
    p.add_argument("--min-requests", type=int, default=16, help="requests per point, at least")
    p.add_argument(
        "--token-range", default="100,1000", help="prompt token ids are drawn from LO,HI"
    )
    p.add_argument("--timeout-s", type=float, default=600.0, help="per point")
    p.add_argument("--json", action="store_true", help="print one JSON object per point")
    p.add_argument(
        "--client-procs",
        type=int,
        default=0,
        help="client processes the streams are split over (0: one per two cores)",
    )
    p.add_argument("--shard", action="store_true", help=argparse.SUPPRESS)  # run_load_procs' child
    args = p.parse_args(argv)
    if args.shard:
        _shard()
        return
    if not args.model:
        p.error("--model is required")
    lo, hi = (int(x) for x in args.token_range.split(","))
    target = Target(args.url.rstrip("/"), args.model, args.api, args.api_key)
    for c in (int(x) for x in args.concurrency.split(",")):
        w = Workload.sized(c, args.prompt_tokens, args.output_tokens, args.min_requests)
        traces, cpu_s = run_load_procs(
            target,
            w,
            make_prompts(w, range(lo, hi), seed=c),
            timeout_s=args.timeout_s,
            procs=args.client_procs or auto_procs(c),
        )
        stats = summarize(traces, c, client_cpu_s=cpu_s)
        errors = sorted({t.error for t in traces if t.error})
        if args.json:
            print(json.dumps({**stats.__dict__, "error_samples": errors[:3]}))
        else:
            print(
                f"c={c:<3} {stats.output_tok_s:9.1f} tok/s  ttft p50 {stats.ttft_p50_ms:8.1f} ms"
                f"  p99 {stats.ttft_p99_ms:8.1f}  itl p50 {stats.itl_p50_ms:7.2f} ms"
                f"  p99 {stats.itl_p99_ms:7.2f}  errors {stats.errors}"
                + (f"  ({errors[0]})" if errors else "")
            )


if __name__ == "__main__":
    main()
