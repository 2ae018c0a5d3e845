"""The MLX engine: one model, served by a worker process of its own (`lmx.runtime.mlx_worker`).

`load` starts the process and waits until it reports the model loaded; meanwhile it loads the
tokenizer here, for the API's templates and encoding. `stream` sends a request to the worker and
receives its deltas from a reader thread, which hands them to the event loop with
`call_soon_threadsafe`. No MLX kernel runs in this process and it holds no model memory, so the
event loop never takes the GIL from a decode step. If the worker dies, its requests end with an
error, the engine turns FAILED and `on_failure` tells the registry.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from multiprocessing.connection import Connection
from typing import Any

import mlx.core as mx
import structlog
from mlx_lm.utils import load_tokenizer

from lmx.errors import GenerationFailed, LmxError, QueueFull, RequestError, TemporaryError
from lmx.runtime.engine import (
    Delta,
    Embeddings,
    EngineState,
    EngineStats,
    GenerationRequest,
    LoadConfig,
    context_exceeded,
)
from lmx.runtime.intake import Intake
from lmx.runtime.mlx_tokenizer import MlxTokenizer
from lmx.runtime.sampling import SamplingDefaults, model_defaults
from lmx.runtime.store import is_embedding_model, named_json_error
from lmx.runtime.worker_protocol import Command, Ready, Report, WorkerStats, receive, send

log = structlog.get_logger(__name__)

# A worker's own memory besides the model: interpreter, MLX, mlx-lm, the tokenizer (~95 MiB
# resident on Linux with the CPU backend). Estimates charge it until a load measures it.
WORKER_PROCESS_BYTES = 128 * 2**20
_EXIT_TIMEOUT_S = 30.0  # for the worker to finish its step and exit when told to stop
# A full queue's Retry-After: from when the last places were freed, within a minute.
_FREED_KEPT = 32
_FREED_WINDOW_S = 60.0

_engines: weakref.WeakSet[MlxEngine] = weakref.WeakSet()


def mlx_counters() -> tuple[int, int]:
    """MLX's (active, cache) bytes summed over every worker process, as each last reported."""
    reports = [e.worker_stats for e in list(_engines)]
    return (
        sum(s.mlx_active_bytes for s in reports if s),
        sum(s.mlx_cache_bytes for s in reports if s),
    )


def device_name() -> str:
    return str(mx.default_device())


WorkerProcess = tuple[subprocess.Popen[bytes], Connection]

# glibc's malloc in a worker (Linux; other C libraries ignore the variable): its heap in
# transparent huge pages, and the thresholds its dynamic ones would reach from the start. A decode
# step on a GPU is mostly the CPU building and launching the graph; on an H100 these made the
# worker's decode steps 6-8% faster (bench/README.md, "The worker's malloc", 2026-12-07).
WORKER_MALLOC = {
    "glibc.malloc.hugetlb": "1",
    "glibc.malloc.mmap_threshold": str(32 * 2**20),
    "glibc.malloc.trim_threshold": str(256 * 2**20),
}


def worker_tunables(environ: Mapping[str, str]) -> str:
    """A worker's GLIBC_TUNABLES: `environ`'s, with each setting of WORKER_MALLOC it does not
    name added."""
    given = [t for t in environ.get("GLIBC_TUNABLES", "").split(":") if t]
    named = {t.partition("=")[0] for t in given}
    added = [f"{name}={value}" for name, value in WORKER_MALLOC.items() if name not in named]
    return ":".join(given + added)


def worker_environment(environ: Mapping[str, str]) -> dict[str, str]:
    """`environ` with a worker's GLIBC_TUNABLES."""
    return {**environ, "GLIBC_TUNABLES": worker_tunables(environ)}


def start_worker() -> WorkerProcess:
    """A worker process and our end of its socket pair. It imports MLX and mlx-lm, then waits for
    the LoadConfig of the model it is to serve; closing our end makes it exit."""
    ours, theirs = socket.socketpair()
    level = logging.getLevelName(logging.getLogger().getEffectiveLevel()).lower()
    with theirs:
        proc = subprocess.Popen(
            [sys.executable, "-m", "lmx.runtime.mlx_worker", str(theirs.fileno()), level],
            pass_fds=(theirs.fileno(),),
            stdin=subprocess.DEVNULL,
            env=worker_environment(os.environ),
        )
    return proc, Connection(ours.detach())


class Spares:
    """Worker processes started ahead of time, their imports done (1-3 s of Python, MLX and
    mlx-lm), waiting for a model: a load takes one instead of starting from nothing, and `refill`
    starts the next one once the load is done. Each costs one idle process (~100 MiB)."""

    def __init__(self, count: int = 1) -> None:
        self._count = count
        self._lock = threading.Lock()
        self._idle: list[WorkerProcess] = []
        self._closed = False

    def take(self) -> WorkerProcess:
        """A spare still alive, else a new worker."""
        with self._lock:
            while self._idle:
                proc, conn = self._idle.pop(0)
                if proc.poll() is None:
                    return proc, conn
                conn.close()  # it died waiting (the OOM killer, a signal): start another
        return start_worker()

    def pids(self) -> frozenset[int]:
        """The idle spares' process ids: memory no model takes (lmx.runtime.memory leaves it out)."""
        with self._lock:
            return frozenset(proc.pid for proc, _ in self._idle)

    def refill(self) -> None:
        with self._lock:
            while not self._closed and len(self._idle) < self._count:
                self._idle.append(start_worker())

    def close(self) -> None:
        """End the idle spares (closing our end of each pair tells it to exit)."""
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for _, conn in idle:
            conn.close()
        for proc, _ in idle:
            try:
                proc.wait(timeout=_EXIT_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@dataclass(eq=False)
class _Stream:
    loop: asyncio.AbstractEventLoop
    out: asyncio.Queue[Delta]


class _Sequence:
    """A sequence's deltas as the worker sends them (`MlxEngine.stream`)."""

    def __init__(self, engine: MlxEngine, sid: int, out: asyncio.Queue[Delta]) -> None:
        self._engine = engine
        self._sid = sid
        self._out = out
        self._open = True

    def __aiter__(self) -> _Sequence:
        return self

    async def __anext__(self) -> Delta:
        if not self._open:
            raise StopAsyncIteration
        delta = await self._out.get()
        # A consumer that fell behind gets what piled up as one delta (per step, not token).
        while delta.finish_reason is None and not self._out.empty():
            delta = _joined(delta, self._out.get_nowait())
        if delta.finish_reason is not None:
            self._open = False
            self._engine.ended(self._sid, delta.finish_reason)
        return delta

    async def aclose(self) -> None:
        if self._open:
            self._open = False
            self._engine.ended(self._sid, None)


def _joined(a: Delta, b: Delta) -> Delta:
    """`b` appended to `a`: the text, tokens and logprobs of both, `a`'s timings, `b`'s ending."""
    return replace(
        b,
        text=a.text + b.text,
        token_ids=a.token_ids + b.token_ids,
        logprobs=a.logprobs + b.logprobs,
        prompt_logprobs=a.prompt_logprobs + b.prompt_logprobs,
        queue_s=a.queue_s if a.queue_s is not None else b.queue_s,
        prefill_s=a.prefill_s if a.prefill_s is not None else b.prefill_s,
    )


def _exit_text(code: int | None) -> str:
    if code is None:
        return "still running"
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-code).name}"
    return f"exit code {code}"


def place_wait_s(freed: Iterable[float], now: float) -> float:
    """About how long until a full queue frees a place, from when places were freed (monotonic
    times, in order): the mean gap between those of the last minute, at least 1 s; 1 s if
    fewer than two were. A client told 1 s while the model frees one in 20 s retries too soon
    and gives up (the openai SDK: twice)."""
    recent = [t for t in freed if now - t <= _FREED_WINDOW_S]
    if len(recent) < 2:
        return 1.0
    return max((recent[-1] - recent[0]) / (len(recent) - 1), 1.0)


class MlxEngine:
    """Implements `lmx.runtime.engine.Engine` on MLX, in a worker process."""

    def __init__(
        self, config: LoadConfig, intake: Intake | None = None, spares: Spares | None = None
    ) -> None:
        self.config = config
        self._intake = intake
        self._spares = spares
        self.on_failure: Callable[[str], None] = lambda _reason: None
        self.worker_stats: WorkerStats | None = None
        self.sampling_defaults = SamplingDefaults()
        self._state = EngineState.UNLOADED
        self._proc: subprocess.Popen[bytes] | None = None
        self._conn: Connection | None = None
        self._send_lock = threading.Lock()
        self._outbox: list[Command] = []  # posted, to go in one message (see _post)
        self._flush_due = False
        self._told_coming = False  # the worker was told of requests still being prepared
        self._reader: threading.Thread | None = None
        self._stopping = False
        self._tokenizer: MlxTokenizer | None = None
        self._context_length = config.context_length or 4096
        self._vocab_size = 0  # the loaded model's, from its worker
        self._embedding_only = False  # a sentence-transformers model: no text from it
        self._streams: dict[int, _Stream] = {}
        self._embeddings: dict[int, asyncio.Future[Embeddings]] = {}
        self._ids = itertools.count()
        self._in_flight = 0
        self._held: dict[str, int] = {}  # places held for requests being built, by request id
        self._served = 0
        self._freed: collections.deque[float] = collections.deque(maxlen=_FREED_KEPT)
        _engines.add(self)

    # -- lifecycle (blocking; called on a worker thread by the registry) --

    @property
    def state(self) -> EngineState:
        return self._state

    @property
    def tokenizer(self) -> MlxTokenizer:
        if self._tokenizer is None:
            raise RuntimeError(f"model {self.config.model_id!r} is not loaded")
        return self._tokenizer

    @property
    def context_length(self) -> int:
        return self._context_length

    @property
    def pid(self) -> int | None:
        """The worker process's id while it runs."""
        return self._proc.pid if self._proc is not None and self._proc.poll() is None else None

    def load(self) -> None:
        self._state = EngineState.LOADING
        self._proc, self._conn = self._spares.take() if self._spares else start_worker()
        try:
            with contextlib.suppress(OSError):  # a worker that died at start: _await_ready says so
                self._send(self.config)
            wrapper = self._load_tokenizer()  # while the worker loads the weights
            ready = self._await_ready()
        except BaseException:
            self._state = EngineState.FAILED
            self._reap(kill=True)
            raise
        finally:
            if self._spares is not None:
                self._spares.refill()
        self._tokenizer = MlxTokenizer(wrapper, self.config, ready.marker_ids)
        self._embedding_only = is_embedding_model(self.config.path)
        self.sampling_defaults = model_defaults(self.config.path)
        self._context_length = ready.context_length
        self._vocab_size = ready.vocab_size
        self.worker_stats = ready.stats
        self._reader = threading.Thread(
            target=self._read, name=f"mlx-{self.config.model_id}", daemon=True
        )
        self._state = EngineState.READY
        self._reader.start()
        log.info(
            "worker_ready", model=self.config.model_id, pid=self._proc.pid, device=ready.device
        )

    def _load_tokenizer(self) -> Any:
        try:
            cfg = json.loads((self.config.path / "config.json").read_text())
            return load_tokenizer(self.config.path, eos_token_ids=cfg.get("eos_token_id"))  # type: ignore[no-untyped-call]
        except json.JSONDecodeError as exc:
            raise named_json_error(exc, self.config.path) from None

    def _await_ready(self) -> Ready:
        assert self._conn is not None and self._proc is not None
        try:
            report: Report = receive(self._conn)
        except (EOFError, ConnectionResetError):
            code = self._proc.wait()
            raise RuntimeError(
                f"the worker process for {self.config.model_id!r} exited while loading "
                f"({_exit_text(code)}); its log lines precede this one"
            ) from None
        match report:
            case ("ready", Ready() as ready):
                return ready
            case ("failed", Exception() as exc):
                raise exc
        raise RuntimeError(f"unexpected report from the worker: {report[0]!r}")

    def unload(self) -> None:
        self._stopping = True
        self._post(("stop",), now=True)
        self._reap(kill=False)
        self.worker_stats = None
        self._state = EngineState.UNLOADED

    def _reap(self, *, kill: bool) -> None:
        """Wait for the worker to exit (killing it if `kill` or it takes too long); close the pair."""
        if self._proc is not None:
            if kill:
                self._proc.kill()
            try:
                self._proc.wait(timeout=_EXIT_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                log.warning("worker_kill", model=self.config.model_id, pid=self._proc.pid)
                self._proc.kill()
                self._proc.wait()
        if self._reader is not None and self._reader is not threading.current_thread():
            self._reader.join()
        if self._conn is not None:
            self._conn.close()

    def resident_bytes(self) -> int:
        s = self.worker_stats
        return s.weights_bytes + s.kv_bytes + s.prompt_cache_bytes if s else 0

    def stats(self) -> EngineStats:
        s = self.worker_stats
        active = s.active if s else 0
        return EngineStats(
            in_flight=self._in_flight,
            queued=max(0, self._in_flight - self.config.max_batch),
            active=active,
            resident_bytes=self.resident_bytes(),
            prompt_cache_bytes=s.prompt_cache_bytes if s else 0,
            steps=s.steps if s else 0,
            prefill_steps=s.prefill_steps if s else 0,
            generated_tokens=s.generated_tokens if s else 0,
            step_s=s.step_s if s else 0.0,
            overhead_s=s.overhead_s if s else 0.0,
            served=self._served,
        )

    # -- the asyncio side --

    @contextlib.contextmanager
    def hold(self, request_id: str, places: int) -> Iterator[None]:
        self._require_ready()
        if places > self.config.max_batch + self.config.max_queue:
            places = 0  # it never fits: its builder refuses it (400), not the queue (429)
        self._require_room(places)
        self._held[request_id] = places
        try:
            yield
        finally:
            del self._held[request_id]

    def stream(self, request: GenerationRequest) -> _Sequence:
        self._require_ready()
        if self._embedding_only:
            raise RequestError(
                f"model {self.config.model_id!r} is an embedding model (its modules.json says"
                " so): it answers /v1/embeddings, not text",
                param="model",
            )
        n_prompt = len(request.prompt_tokens)
        if n_prompt == 0:
            raise RequestError("the prompt is empty", param="prompt")
        if n_prompt + request.params.max_tokens > self._context_length:
            limit, wanted = self._context_length, request.params.max_tokens
            raise context_exceeded(limit, n_prompt, wanted, "max_tokens")
        request = self._within_vocabulary(request)
        self._take_place(request.request_id)
        sid = next(self._ids)
        st = _Stream(asyncio.get_running_loop(), asyncio.Queue())
        self._streams[sid] = st
        self._in_flight += 1
        try:
            # Again, now that the sweep of a worker that dies would end it: it may have died
            # since, its sweep done.
            self._require_ready()
        except RequestError:
            self.ended(sid, "error")
            raise
        if self._intake is not None:
            self._intake.reached_engine()
        self._post(("add", sid, request))
        return _Sequence(self, sid, st.out)

    def ended(self, sid: int, finish_reason: str | None) -> None:
        """Sequence `sid`'s stream ended, its place free again: with its last delta's
        `finish_reason`, or closed before (None), which removes it from the batch too."""
        self._in_flight -= 1
        self._freed.append(time.monotonic())
        self._streams.pop(sid, None)
        if finish_reason is None:  # at once, with whatever is posted before it (its add, maybe)
            self._post(("cancel", sid), now=True)
        elif finish_reason != "error":
            self._served += 1

    async def embed(self, inputs: Sequence[Sequence[int]], request_id: str = "") -> Embeddings:
        self._require_ready()
        rows = tuple(tuple(int(t) for t in row) for row in inputs)
        for i, row in enumerate(rows):
            if not row:
                raise RequestError(f"input {i} is empty", param="input")
            if len(row) > self._context_length:
                raise RequestError(
                    f"input {i} has {len(row)} tokens; this model's maximum context length is "
                    f"{self._context_length} tokens",
                    param="input",
                    code="context_length_exceeded",
                )
            self._check_ids("input", row)
        self._take_place(request_id)
        sid = next(self._ids)
        answer: asyncio.Future[Embeddings] = asyncio.get_running_loop().create_future()
        self._embeddings[sid] = answer
        self._in_flight += 1
        try:
            self._require_ready()  # again: the worker may have died since
            self._post(("embed", sid, rows))
            return await answer
        finally:
            self._in_flight -= 1
            self._freed.append(time.monotonic())
            self._embeddings.pop(sid, None)
            if answer.cancelled() or not answer.done():  # the caller gave up: rows left go
                self._post(("cancel", sid), now=True)

    def _require_ready(self) -> None:
        if self._state is not EngineState.READY:
            raise RequestError(f"model {self.config.model_id!r} is not ready")

    def _take_place(self, request_id: str) -> None:
        """A place in the queue for one of `request_id`'s sequences: one it holds, else a free
        one (QueueFull if none is)."""
        held = self._held.get(request_id, 0)
        if held:
            self._held[request_id] = held - 1
        else:
            self._require_room()

    def _require_room(self, places: int = 1) -> None:
        """QueueFull unless `places` more fit beside the requests the model has and those held
        for requests on their way: as many as its batch and queue take."""
        taken = self._in_flight + sum(self._held.values())
        if taken + places > self.config.max_batch + self.config.max_queue:
            raise QueueFull(
                f"model {self.config.model_id!r} has too many requests queued",
                delay_s=place_wait_s(self._freed, time.monotonic()),
            )

    def _within_vocabulary(self, request: GenerationRequest) -> GenerationRequest:
        """`request` as the worker may take it, or RequestError naming the field: a token id
        outside the vocabulary would index past the model's embedding or logits (the worker
        crashes); a top_k at or past the vocabulary's size filters nothing, so it is dropped."""
        p = request.params
        self._check_ids("prompt", request.prompt_tokens)
        self._check_ids("logit_bias", p.logit_bias.keys())
        self._check_ids("stop_token_ids", p.stop_token_ids)
        if p.top_k >= self._vocab_size:
            return replace(request, params=replace(p, top_k=0))
        return request

    def _check_ids(self, param: str, ids: Iterable[int]) -> None:
        vocab = self._vocab_size
        bad = next((t for t in ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise RequestError(
                f"token id {bad} is outside the model's vocabulary (0 to {vocab - 1})",
                param=param,
            )

    def _send(self, msg: LoadConfig) -> None:
        if self._conn is None:
            raise OSError("the worker is not running")
        with self._send_lock:
            send(self._conn, msg)

    def _post(self, cmd: Command, *, now: bool = False) -> None:
        """Send `cmd` to the worker at the end of this turn of the event loop, or once the intake
        lets a burst go (`now`: at once). Commands posted meanwhile go as one message, which the
        worker applies in one go: the burst joins the batch in one step (see lmx.runtime.intake).
        """
        with self._send_lock:
            self._outbox.append(cmd)
            if self._flush_due and not now:
                return
            self._flush_due = True
        loop = None
        if not now:
            with contextlib.suppress(RuntimeError):  # no event loop: nothing to wait for
                loop = asyncio.get_running_loop()
        if loop is None:
            self._flush()
        elif self._intake is not None:
            self._intake.hold(self.config.model_id, self._flush)
        else:
            loop.call_soon(self._flush)

    def _flush(self) -> None:
        with self._send_lock:
            cmds, self._outbox, self._flush_due = self._outbox, [], False
            if cmds and self._conn is not None:
                if self._intake is not None and any(c[0] == "add" for c in cmds):
                    coming = self._intake.count_coming(self.config.model_id, self._none_coming)
                    if coming:
                        cmds.append(("coming", coming))
                        self._told_coming = True
                with contextlib.suppress(OSError):  # a dead worker: the reader ends the streams
                    send(self._conn, cmds)

    def _none_coming(self) -> None:
        """No request is being prepared any more: the worker has all there is (what is posted
        goes with this), and need not wait on."""
        with self._send_lock:
            if not self._told_coming:
                return
            self._told_coming = False
            cmds, self._outbox, self._flush_due = self._outbox, [], False
            if self._conn is not None:
                with contextlib.suppress(OSError):
                    send(self._conn, [*cmds, ("coming", 0)])

    # -- the reader thread --

    def _read(self) -> None:
        assert self._conn is not None and self._proc is not None
        try:
            while True:
                report: Report = receive(self._conn)
                match report:
                    case ("out", pieces, items, stats):
                        self.worker_stats = stats
                        if pieces:
                            items += [(sid, Delta(text, (token,))) for sid, text, token in pieces]
                        if items:
                            self._deliver(items)
                    case ("embedded", sid, Embeddings() as result):
                        self._answer(sid, result)
                    case ("embed_failed", sid, str(message), bool(requests_fault)):
                        self._answer(sid, self._embed_fault(message, requests_fault))
        except (EOFError, OSError):
            pass
        reason = "the model was unloaded"
        if not self._stopping:
            code = self._proc.wait()
            reason = f"the model's worker process exited unexpectedly ({_exit_text(code)})"
            self._state = EngineState.FAILED  # before the sweep below: new streams see it
            log.error("worker_exited", model=self.config.model_id, reason=reason)
            self.on_failure(reason)
        self.worker_stats = None
        ended = Delta("", finish_reason="error", error=reason, retryable=self._stopping)
        self._deliver([(sid, ended) for sid in list(self._streams)])
        for sid in list(self._embeddings):
            self._answer(sid, self._embed_fault(reason, False))

    def _embed_fault(self, message: str, requests_fault: bool) -> LmxError:
        """An embedding's error: the request's (400), the model unloaded under it (503: asked
        again, it is loaded again), or a failure (500)."""
        if requests_fault:
            return RequestError(message)
        return TemporaryError(message, delay_s=1.0) if self._stopping else GenerationFailed(message)

    def _answer(self, sid: int, result: Embeddings | Exception) -> None:
        """Settle embedding request `sid` (if its caller still waits) on its event loop."""
        answer = self._embeddings.get(sid)
        if answer is None:
            return

        def settle() -> None:
            if answer.done():
                return
            if isinstance(result, Exception):
                answer.set_exception(result)
            else:
                answer.set_result(result)

        with contextlib.suppress(RuntimeError):  # the loop closed: nobody is waiting
            answer.get_loop().call_soon_threadsafe(settle)

    def _deliver(self, items: list[tuple[int, Delta]]) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[_Stream, Delta]]] = {}
        for sid, delta in items:
            st = self._streams.get(sid)
            if st is not None:  # else cancelled meanwhile
                by_loop.setdefault(st.loop, []).append((st, delta))
        for loop, batch in by_loop.items():

            def put(batch: list[tuple[_Stream, Delta]] = batch) -> None:
                for st, delta in batch:
                    st.out.put_nowait(delta)

            with contextlib.suppress(RuntimeError):  # the loop closed: nobody is listening
                loop.call_soon_threadsafe(put)
