"""An HTTP load generator for any OpenAI-compatible server: N closed-loop streaming clients.

Sends /v1/completions (token-id prompts: exact length) or /v1/chat/completions over HTTP/1.1
(one keep-alive connection per stream, framed by h11) with SSE streaming, EOS ignored via the vLLM
extensions `ignore_eos` and `min_tokens`, and records a RequestTrace per request; the streams may
be split over several client processes (`run_load_procs`). Called by bench.run_throughput;
standalone: `python -m bench.loadgen`. Every loop is bounded in count and time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import asdict, dataclass, replace
from typing import Any, Literal

import h11

from bench.cpus import pin_process
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


_CONNECT_TIMEOUT_S = 30.0


class _BadStream(Exception):
    """The server's stream said something went wrong, or went on too long."""


class Http11:
    """One keep-alive HTTP/1.1 connection (asyncio streams, framed by h11), reopened when the
    server closed it. A stream's client: about half the CPU per streamed chunk of httpx's
    layers (85 against 205 us, chunks 1 ms apart, 2-core machine), which a load generator
    should spend on measuring rather than on itself."""

    def __init__(self, base_url: str, headers: dict[str, str]) -> None:
        url = urllib.parse.urlsplit(base_url)
        if url.scheme not in ("http", "https") or not url.hostname:
            raise ValueError(f"not an http(s) URL: {base_url}")
        self._tls = url.scheme == "https"
        self._host = url.hostname
        self._port = url.port or (443 if self._tls else 80)
        self._prefix = url.path.rstrip("/")
        self._headers = [("Host", url.netloc), *headers.items()]
        self._conn: h11.Connection | None = None
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def request(
        self,
        method: str,
        path: str,
        body: bytes = b"",
        on_written: Callable[[], None] = lambda: None,
    ) -> tuple[int, AsyncIterator[bytes]]:
        """Send a request; its status and an iterator over its body, which must be read to the end
        before the next request. A kept-alive connection the server has closed is reopened and
        the request sent again once."""
        for attempt in (0, 1):
            fresh = await self._ready()
            try:
                self._send(method, path, body)
                assert self._writer is not None
                await self._writer.drain()
                on_written()
                event = await self._next()
                if not isinstance(event, h11.Response):  # e.g. ConnectionClosed
                    raise h11.RemoteProtocolError(f"expected a response, got {event!r}")
            except (ConnectionError, h11.RemoteProtocolError):
                self.close()
                if fresh or attempt:
                    raise
                continue
            return event.status_code, self._body()
        raise AssertionError("unreachable: the second attempt opens a connection")

    async def _ready(self) -> bool:
        """Whether the connection had to be opened for this request."""
        if self._conn is not None and self._conn.our_state is h11.IDLE:
            return False
        self.close()
        self._reader, self._writer = await asyncio.open_connection(
            self._host, self._port, ssl=True if self._tls else None
        )
        self._conn = h11.Connection(h11.CLIENT)
        return True

    def _send(self, method: str, path: str, body: bytes) -> None:
        assert self._conn is not None and self._writer is not None
        headers = [*self._headers, ("Content-Length", str(len(body)))]
        if body:
            headers.append(("Content-Type", "application/json"))
        request = h11.Request(method=method, target=self._prefix + path, headers=headers)
        self._writer.write(
            self._conn.send(request)
            + (self._conn.send(h11.Data(data=body)) or b"")
            + (self._conn.send(h11.EndOfMessage()) or b"")
        )

    async def _next(self) -> object:
        """The next event from the server, reading as much as it takes (h11 raises
        RemoteProtocolError if the connection ends in the middle of a message)."""
        assert self._conn is not None and self._reader is not None
        while True:
            event = self._conn.next_event()
            if event is not h11.NEED_DATA:
                return event
            self._conn.receive_data(await self._reader.read(65536))

    async def _body(self) -> AsyncIterator[bytes]:
        while True:
            event = await self._next()
            if isinstance(event, h11.EndOfMessage):
                break
            if not isinstance(event, h11.Data):
                raise h11.RemoteProtocolError(f"in a response body: {event!r}")
            yield bytes(event.data)
        assert self._conn is not None
        if self._conn.our_state is h11.DONE and self._conn.their_state is h11.DONE:
            self._conn.start_next_cycle()
        else:  # the server closes this one
            self.close()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        self._conn = self._reader = self._writer = None


async def one_request(
    client: Http11, target: Target, prompt: list[int], output_tokens: int
) -> RequestTrace:
    """Send one streaming request and time each chunk that carries text. Never raises."""
    path = "/chat/completions" if target.api == "chat" else "/completions"
    trace = RequestTrace(sent_s=time.perf_counter())
    usage_tokens: int | None = None
    max_lines = 4 * output_tokens + 64  # data lines and blank separators, with slack

    def written() -> None:
        trace.written_s = time.perf_counter()

    try:
        body = json.dumps(request_body(target, prompt, output_tokens)).encode()
        status, chunks = await client.request("POST", path, body, written)
        if status != 200:
            text = b"".join([c async for c in chunks])[:300].decode(errors="replace")
            trace.error = f"HTTP {status}: {text}"
            return trace
        lines, rest = 0, b""
        async for chunk in chunks:
            now = time.perf_counter()
            *complete, rest = (rest + chunk).split(b"\n")
            for raw in complete:
                lines += 1
                if lines > max_lines:
                    raise _BadStream(f"more than {max_lines} SSE lines")
                line = raw.decode().strip()
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    # Read on to the end of the body, as the openai SDK does, so that the
                    # connection stays open for the stream's next request.
                    continue
                event = json.loads(data)
                if "error" in event:
                    raise _BadStream(str(event["error"].get("message", event["error"])))
                if any(_chunk_text(c) for c in event.get("choices") or ()):
                    trace.chunk_s.append(now)
                if event.get("usage"):
                    usage_tokens = int(event["usage"]["completion_tokens"])
    except _BadStream as exc:
        trace.error = str(exc)
        client.close()  # mid-body: this connection cannot carry another request
    except (OSError, h11.ProtocolError, json.JSONDecodeError, KeyError, ValueError) as exc:
        trace.error = f"{type(exc).__name__}: {exc}"
        client.close()
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
    clients = [Http11(target.base_url, headers) for _ in range(workload.concurrency)]

    async def stream(s: int) -> list[RequestTrace]:
        return [
            await one_request(clients[s], target, p, workload.output_tokens) for p in prompts[s]
        ]

    async def warm(client: Http11) -> None:
        status, body = await client.request("GET", "/models")
        async for _ in body:
            pass
        if status != 200:
            raise RuntimeError(f"GET /models: HTTP {status}")

    try:
        # Each stream's connection open before the clock starts, as a long-running client's is.
        async with asyncio.timeout(_CONNECT_TIMEOUT_S):
            await asyncio.gather(*(warm(c) for c in clients))
        if ready is not None:
            await ready()
        async with asyncio.timeout(timeout_s):
            per_stream = await asyncio.gather(*(stream(s) for s in range(workload.concurrency)))
    finally:
        for c in clients:
            c.close()
    return [t for traces in per_stream for t in traces]


def auto_procs(cores: int, concurrency: int) -> int:
    """Client processes for `concurrency` streams on `cores` cores: one per two cores, at most
    one per stream."""
    return max(1, min(concurrency, cores // 2))


def run_load_procs(
    target: Target,
    workload: Workload,
    prompts: Prompts,
    *,
    timeout_s: float,
    procs: int,
    cpus: frozenset[int] | None = None,
) -> tuple[list[RequestTrace], float]:
    """`run_load` with the streams split over `procs` client processes that start together: the
    traces in stream order and the CPU seconds the clients used. With `cpus`, the clients run on
    those CPUs only (in processes of their own even when `procs` is 1).

    One Python process parsing every stream's chunks and sending every next request spends ms of
    CPU per request (httpx: 13 ms for a request of 4 tokens on a 2-core machine): at 32 streams a
    round's requests would leave it over tens of ms, which measures the client. Clients in
    processes of their own, as a server's real clients are, send theirs within a few ms. Raises
    TimeoutError as `run_load` does.
    """
    c = workload.concurrency
    procs = max(1, min(procs, c))
    if procs == 1 and cpus is None:
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
                "cpus": sorted(cpus) if cpus is not None else None,
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
    if spec["cpus"] is not None:
        pin_process(frozenset(spec["cpus"]))
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
            procs=args.client_procs or auto_procs(os.cpu_count() or 1, c),
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
