"""lmx's worker against raw's loop, without HTTP: do lmx's decode steps cost more?

bench.run_throughput compares lmx over HTTP with raw in another process, runs seconds apart;
when lmx's decode steps come out slower there, that cannot tell lmx's worker from the rest of an
HTTP run (the daemon and the clients busy on other cores) or from the host moving between runs.
This takes both out: one model, short blocks of requests that alternate between

- raw: bench.raw's loop (`insert`, `next`) on a BatchGenerator of its own;
- again: the same loop once more, on another BatchGenerator (raw against itself: the A/A test);
- hosted: the same loop beside an lmx `Worker` loaded and idle (its tokenizer, grammar tokenizer,
  output thread and reader): with `--processes`, whether what the worker brings into a process
  slows raw's steps;
- thread: lmx's `Worker` (lmx.runtime.mlx_worker) stepping as in the daemon, its output thread
  making each step's text and sending it to another process that reads it, as the engine does;
- inline: the same, with the text made and sent on the stepping thread;
- quiet: as thread, but nothing reads the messages until the block ends (no wakeups elsewhere);
- nocache: as thread, without the prompt cache (what storing each ended sequence's cache costs);
- piled: raw's loop beside idle arrays as many and as large as the buffers that a prompt cache of
  per-layer copies (lmx's before 2026-12-04) holds: whether live buffers slow the steps;
- lumped: raw's loop beside the same bytes in 8 arrays;
- tuned (`--processes` only): raw's loop in a process started with the glibc malloc settings lmx
  starts its workers with (`lmx.runtime.mlx_engine.WORKER_MALLOC`), as lmx's modes' processes
  are: what those settings give raw's loop, and whether lmx's worker still costs more beside it.

By default every mode runs in this process and they share the model's weights. With
`--processes` each runs in a process of its own that loads the model itself, as raw's process
and lmx's worker do in an HTTP run: what separate processes bring (their own allocator, MLX
streams, Python heap), still without HTTP. lmx's modes' processes start with lmx's workers'
malloc settings, raw's with the environment's. Where a process's code and data land in memory is
new with each process and moves its speed as a whole: on a 2-core CPU, raw's loop beside an idle
worker ran 18% faster than raw's in one run and 2% slower in the next, whose raw against itself in
another process differed by 1.2% in its rounds (p < 0.001; bench/README.md, 2026-12-05). So one
process per mode compares two processes, not two modes; `--draws N` makes each mode's process
anew N times per concurrency, and sums each pair up per draw too.

Each block runs `--requests` greedy requests per stream, EOS ignored. Per block: the median of its
decode steps (`BatchGenerator.next` without prompt work), wall and the stepping thread's CPU time,
and the whole block's time, which adds prompt steps and everything between steps (the worker's
own work, a round's end included): its ratios are lmx's throughput against raw's without HTTP. A
round runs each mode once, starting one mode later each round; per pair of modes, the rounds'
ratios are pooled as bench.pool pools pairs (median, distribution-free interval, sign test), and
so are each draw's medians.
Writes bench/results/worker-ab-<preset>-<label>.{json,md}.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import itertools
import json
import multiprocessing
import os
import platform
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, NamedTuple
from unittest import mock

import mlx.core as mx
import numpy as np
from mlx_lm import load as mlx_load

from bench.cpus import pin_process, pin_stepper
from bench.pairs import Pairs, cell
from bench.raw import batch_generator
from bench.report import write_result
from bench.synth import PRESET_NAMES, ensure_model, printable_token_ids
from lmx.runtime import mlx_worker
from lmx.runtime.engine import GenerationRequest, LoadConfig, SamplingParams
from lmx.runtime.mlx_engine import worker_tunables
from lmx.runtime.mlx_tokenizer import MlxTokenizer

MODES = ("raw", "again", "hosted", "thread", "inline", "quiet", "nocache", "piled", "lumped")
PROCESS_MODES = (*MODES, "tuned")  # with --processes
RAW_MODES = frozenset({"raw", "again", "tuned"})
# The modes whose processes start as lmx starts its workers, with its malloc settings.
WORKER_MALLOC_MODES = frozenset({"thread", "inline", "quiet", "nocache", "tuned"})
PILED_MODES = frozenset({"piled", "lumped"})
MAX_BATCH = 32
_PILE_BYTES = LoadConfig.prompt_cache_bytes  # the default prompt cache's budget
_BUFFER = 8 << 20  # a quiet worker's socket holds a block's messages until the block ends
_READER = "import os, sys\nfd = int(sys.argv[1])\nwhile os.read(fd, 1 << 20):\n    pass\n"

Prompts = list[list[list[int]]]  # per stream, its requests' prompt token ids


class Block(NamedTuple):
    """One block's measures: its median decode step (ms, wall and CPU) and its time (s)."""

    wall_ms: float
    cpu_ms: float
    block_s: float


# A pair's measures: (key, column), each a field of Block.
MEASURES = (("wall", "decode step, wall"), ("cpu", "decode step, CPU"), ("block", "whole block"))


class _Timed:
    """Wraps a BatchGenerator's `next`: the wall and thread-CPU ms of each decode step."""

    def __init__(self, gen: Any) -> None:
        self._next = gen.next
        gen.next = self
        self.steps: list[tuple[float, float]] = []

    def __call__(self) -> Any:
        c0, t0 = time.thread_time(), time.perf_counter()
        prompts, responses = out = self._next()
        t1, c1 = time.perf_counter(), time.thread_time()
        if not prompts and responses:
            self.steps.append(((t1 - t0) * 1e3, (c1 - c0) * 1e3))
        return out

    def take(self) -> tuple[float, float]:
        """The median wall and CPU ms of the decode steps since the last take."""
        wall, cpu = zip(*self.steps, strict=True)
        self.steps = []
        return statistics.median(wall), statistics.median(cpu)


class _Side:
    """One mode: runs blocks of requests, each stream's one after another."""

    def __init__(self, gen: Any) -> None:
        self.gen = gen
        self.timed = _Timed(gen)

    def start(self, prompt: list[int], output_tokens: int) -> int:
        """Send a request in; its id."""
        raise NotImplementedError

    def step(self, live: Collection[int]) -> list[int]:
        """One step of the batch; the ids of the `live` requests that ended."""
        raise NotImplementedError

    def block(self, prompts: Prompts, output_tokens: int) -> None:
        """Each stream's requests to the end, the next sent as soon as the last one ends."""
        queues = [list(p) for p in prompts]
        live = {self.start(q.pop(), output_tokens): stream for stream, q in enumerate(queues)}
        for _ in range(_max_steps(prompts, output_tokens)):
            if not live:
                return
            for ended in self.step(live):
                if queues[stream := live.pop(ended)]:
                    live[self.start(queues[stream].pop(), output_tokens)] = stream
        raise RuntimeError(f"{type(self).__name__}: a block did not finish")

    def before(self) -> None:
        """Before each block, outside the timing."""

    def after(self) -> None:
        """Between blocks, outside the timing."""

    def close(self) -> None:
        self.gen.close()


class _RawSide(_Side):
    """bench.raw's loop on a BatchGenerator of its own."""

    def __init__(self, model: Any, prompt_tokens: int) -> None:
        super().__init__(batch_generator(model, MAX_BATCH, prompt_tokens))

    def start(self, prompt: list[int], output_tokens: int) -> int:
        (uid,) = self.gen.insert([prompt], max_tokens=[output_tokens])
        return int(uid)

    def step(self, live: Collection[int]) -> list[int]:
        return [r.uid for r in self.gen.next()[1] if r.finish_reason is not None]


class _PiledSide(_RawSide):
    """raw's loop beside idle bf16 arrays (the synthetic models' KV dtype) of a prompt cache's
    budget: after each block, for each of its requests, its keys and values of each layer, one
    array each, the oldest dropped past the budget (`lumped` False); or, from the start, the
    budget in 8 arrays."""

    def __init__(self, model: Any, model_dir: Path, prompt_tokens: int, *, lumped: bool) -> None:
        super().__init__(model, prompt_tokens)
        config = json.loads((model_dir / "config.json").read_text())
        self._layers = int(config["num_hidden_layers"])
        self._heads = int(config["num_key_value_heads"])
        self._dims = int(
            config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
        )
        self._ended: list[int] = []  # the last block's requests' tokens
        self._pile: deque[list[mx.array]] = deque()
        if lumped:
            self._pile.append([mx.ones((_PILE_BYTES // 16,), mx.bfloat16) for _ in range(8)])
            mx.eval(self._pile[0])
        self._lumped = lumped

    def block(self, prompts: Prompts, output_tokens: int) -> None:
        super().block(prompts, output_tokens)
        self._ended = [len(p) + output_tokens for stream in prompts for p in stream]

    def after(self) -> None:
        if self._lumped:
            return
        for tokens in self._ended:
            shape = (1, self._heads, tokens, self._dims)
            self._pile.append([mx.ones(shape, mx.bfloat16) for _ in range(2 * self._layers)])
            mx.eval(self._pile[-1])
        while sum(a.nbytes for entry in self._pile for a in entry) > _PILE_BYTES:
            self._pile.popleft()


class _WorkerSide(_Side):
    """lmx's Worker without its process: its own gen, fed here; the model shared (`loaded`, as
    mlx_load returned it) or, with `loaded` None, loaded as the worker loads it."""

    def __init__(self, model_dir: Path, loaded: Any, mode: str) -> None:
        ours, theirs = socket.socketpair()
        self._reader: subprocess.Popen[bytes] | None = None
        self._quiet: socket.socket | None = None
        if mode == "quiet":
            for s in (ours, theirs):
                s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _BUFFER)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _BUFFER)
            theirs.setblocking(False)
            self._quiet = theirs
        else:
            fd = theirs.detach()
            self._reader = subprocess.Popen([sys.executable, "-c", _READER, str(fd)], pass_fds=[fd])
            os.close(fd)
        config = LoadConfig(model_id=model_dir.name, path=model_dir, max_batch=MAX_BATCH)
        if mode == "nocache":
            config = replace(config, prompt_cache_bytes=0)
        self.worker = w = mlx_worker.Worker(config, Connection(ours.detach()))
        with (
            contextlib.nullcontext()
            if loaded is None
            else mock.patch.object(mlx_worker, "mlx_load", lambda _path: loaded)
        ):
            self.model, wrapper, gen, ready = w._load()
        w.tokenizer = MlxTokenizer(wrapper, config, ready.marker_ids)
        self._output: threading.Thread | None = None
        if mode == "inline":
            w._outbox = _Inline(w)  # type: ignore[assignment]
        else:
            self._output = threading.Thread(target=w._emit_all, name="output")
            self._output.start()
        super().__init__(gen)
        self._sids = itertools.count(1)

    def start(self, prompt: list[int], output_tokens: int) -> int:
        """The engine's `add` command, in the worker's inbox."""
        sid = next(self._sids)
        params = SamplingParams(
            max_tokens=output_tokens, temperature=0.0, min_tokens=output_tokens, ignore_eos=True
        )
        request = GenerationRequest(tuple(prompt), params, request_id=str(sid))
        self.worker._inbox.put((time.perf_counter(), [("add", sid, request)]))
        return sid

    def step(self, live: Collection[int]) -> list[int]:
        """One pass of the worker's serving loop, its commands queued already."""
        self.worker._serve_once(self.gen, 0.0)
        return [sid for sid in live if sid not in self.worker._by_sid]

    def after(self) -> None:
        if self._quiet is None:
            return
        with contextlib.suppress(BlockingIOError):
            while self._quiet.recv(1 << 20):
                pass

    def close(self) -> None:
        if self._output is not None:
            self.worker._outbox.put(None)  # ends the output thread
            self._output.join()
        self.worker._conn.close()
        if self._quiet is not None:
            self._quiet.close()
        if self._reader is not None:  # it reads to the end of what was sent, then exits
            self._reader.wait()
        super().close()


class _HostedSide(_RawSide):
    """raw's loop on the model of an lmx Worker that stays loaded and idle beside it."""

    def __init__(self, model_dir: Path, loaded: Any, prompt_tokens: int) -> None:
        self._host = _WorkerSide(model_dir, loaded, "thread")
        try:
            super().__init__(self._host.model, prompt_tokens)
        except BaseException:
            self._host.close()
            raise

    def close(self) -> None:
        super().close()
        self._host.close()


class _Inline:
    """A Worker's outbox that makes each step's text at once, on the stepping thread."""

    def __init__(self, worker: Any) -> None:
        self._w = worker

    def put(self, item: Any) -> None:
        if isinstance(item, mlx_worker._StepOutput):
            self._w._emit(item)
            self._w._sent += 1
        elif item is not None:
            self._w._send(item)


def _max_steps(prompts: Prompts, output_tokens: int) -> int:
    """A bound on a block's loop besides its requests' end: prefills and decodes, with slack."""
    return 4 * sum(len(p) for p in prompts) * (output_tokens + 2) + 100


@dataclass(frozen=True)
class Point:
    concurrency: int
    blocks: dict[str, list[Block]]  # per mode, per round
    draws: tuple[int, ...]  # per round, the draw (set of sides) that ran it

    def pooled(self, a: str, b: str, which: int) -> Pairs:
        """Per round, a's measure over b's (`which`: a field of Block), b's speed relative to
        a's: below 1, b took longer."""
        return Pairs(
            tuple(x[which] / y[which] for x, y in zip(self.blocks[a], self.blocks[b], strict=True))
        )

    def by_draw(self, a: str, b: str, which: int) -> Pairs:
        """Per draw, the median of its rounds' ratios (as `pooled`). A process's layout in
        memory, new with each, moves all of its rounds together: with `--processes`, rounds
        tell two processes apart, draws tell two modes apart."""
        per: dict[int, list[float]] = {}
        for draw, ratio in zip(self.draws, self.pooled(a, b, which).values, strict=True):
            per.setdefault(draw, []).append(ratio)
        return Pairs(tuple(statistics.median(v) for v in per.values()))

    def to_json(self) -> dict[str, Any]:
        pairs = {
            f"{a}/{b}": {
                **{key: self.pooled(a, b, i).to_json() for i, (key, _) in enumerate(MEASURES)},
                "by_draw": {
                    key: self.by_draw(a, b, i).to_json() for i, (key, _) in enumerate(MEASURES)
                },
            }
            for a, b in itertools.combinations(self.blocks, 2)
        }
        return {
            "concurrency": self.concurrency,
            "blocks": self.blocks,
            "draws": list(self.draws),
            "pairs": pairs,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Point:
        """`to_json` undone (its pairs are derived again); a run from before draws was one.
        ValueError for a mode not in PROCESS_MODES or draws not one per round."""
        blocks = {m: [Block(*map(float, b)) for b in rows] for m, rows in data["blocks"].items()}
        if unknown := set(blocks) - set(PROCESS_MODES):
            raise ValueError(f"unknown modes {', '.join(sorted(unknown))}")
        rounds = {len(rows) for rows in blocks.values()}
        if len(rounds) != 1:
            raise ValueError(f"modes with different numbers of rounds: {sorted(rounds)}")
        (n,) = rounds
        draws = tuple(int(d) for d in data.get("draws", [0] * n))
        if len(draws) != n:
            raise ValueError(f"{len(draws)} draws for {n} rounds")
        return cls(int(data["concurrency"]), blocks, draws)


def _make_side(mode: str, model_dir: Path, loaded: Any, prompt_tokens: int) -> _Side:
    """`mode`'s side on the model `loaded` (as mlx_load returned it), or, with None, on a model
    of its own loaded as raw's process or lmx's worker loads it."""
    if mode in RAW_MODES or mode in PILED_MODES:
        model = (mlx_load(str(model_dir)) if loaded is None else loaded)[0]
        if mode in RAW_MODES:
            return _RawSide(model, prompt_tokens)
        return _PiledSide(model, model_dir, prompt_tokens, lumped=mode == "lumped")
    if mode == "hosted":
        return _HostedSide(model_dir, loaded, prompt_tokens)
    return _WorkerSide(model_dir, loaded, mode)


def _run_block(side: _Side, prompts: Prompts, output_tokens: int) -> Block:
    side.before()
    t0 = time.perf_counter()
    side.block(prompts, output_tokens)
    block_s = time.perf_counter() - t0
    side.after()
    return Block(*side.timed.take(), block_s)


def _settle(step_cpu: int | None, rest: frozenset[int] | None) -> None:
    """After the first blocks: the heap frozen as the worker freezes it once loaded, and the
    stepping thread (this process's main thread) on `step_cpu` alone."""
    gc.collect()
    gc.freeze()
    if step_cpu is not None and rest:
        pin_stepper(os.getpid(), step_cpu, rest)


# What makes a mode's side: (mode, model directory, the model as mlx_load returned it or None for
# one of its own, prompt tokens).
MakeSide = Callable[[str, Path, Any, int], _Side]


class _InProcess:
    """Every mode's side in this process, on one model."""

    def __init__(
        self, modes: Sequence[str], model_dir: Path, prompt_tokens: int, make_side: MakeSide
    ) -> None:
        loaded = mlx_load(str(model_dir))
        self._sides: dict[str, _Side] = {}
        try:
            for m in modes:
                self._sides[m] = make_side(m, model_dir, loaded, prompt_tokens)
        except BaseException:
            self.close()
            raise
        self.pids = dict.fromkeys(modes, os.getpid())

    def run(self, mode: str, prompts: Prompts, output_tokens: int) -> Block:
        return _run_block(self._sides[mode], prompts, output_tokens)

    def settle(self, step_cpu: int | None, rest: frozenset[int] | None) -> None:
        _settle(step_cpu, rest)

    def close(self) -> None:
        gc.unfreeze()
        for side in self._sides.values():
            side.close()


class _Processes:
    """Each mode's side in a process of its own, which loads the model itself and runs the
    blocks this process sends it (`_serve_side`)."""

    def __init__(self, modes: Sequence[str], model_dir: Path, prompt_tokens: int) -> None:
        ctx = multiprocessing.get_context("spawn")  # MLX's threads and device do not survive fork
        self._procs: dict[str, Any] = {}
        self._conns: dict[str, Connection] = {}
        self.pids: dict[str, int] = {}
        try:
            for m in modes:
                ours, theirs = ctx.Pipe()
                proc = ctx.Process(
                    target=_serve_side,
                    args=(theirs, m, model_dir, prompt_tokens),
                    name=f"worker-ab-{m}",
                    daemon=True,
                )
                with _environment(m):
                    proc.start()
                theirs.close()
                self._procs[m], self._conns[m] = proc, ours
            for m in modes:
                self.pids[m] = self._answer(m)
        except BaseException:
            self.close()
            raise

    def _answer(self, mode: str) -> Any:
        try:
            kind, value = self._conns[mode].recv()
        except EOFError:
            self._procs[mode].join(5)
            code = self._procs[mode].exitcode
            raise RuntimeError(f"{mode}: its process ended (exit code {code})") from None
        if kind == "error":
            raise RuntimeError(f"{mode}: {value}")
        return value

    def run(self, mode: str, prompts: Prompts, output_tokens: int) -> Block:
        self._conns[mode].send(("block", prompts, output_tokens))
        return Block(*self._answer(mode))

    def settle(self, step_cpu: int | None, rest: frozenset[int] | None) -> None:
        for m, conn in self._conns.items():
            conn.send(("settle", step_cpu, rest))
            self._answer(m)
        if step_cpu is not None and rest:  # this process only waits: off the stepping CPU
            os.sched_setaffinity(0, rest)

    def close(self) -> None:
        for conn in self._conns.values():
            with contextlib.suppress(OSError):
                conn.send(None)
        for proc in self._procs.values():
            proc.join(60)
            if proc.is_alive():
                proc.kill()
                proc.join()
        for conn in self._conns.values():
            conn.close()


def mode_tunables(mode: str, environ: Mapping[str, str]) -> str:
    """GLIBC_TUNABLES of a `--processes` side of `mode`, in a run started in `environ`."""
    if mode in WORKER_MALLOC_MODES:
        return worker_tunables(environ)
    return environ.get("GLIBC_TUNABLES", "")


@contextlib.contextmanager
def _environment(mode: str) -> Iterator[None]:
    """The environment a `--processes` side of `mode` starts in (the process inherits it)."""
    before = os.environ.get("GLIBC_TUNABLES")
    os.environ["GLIBC_TUNABLES"] = mode_tunables(mode, os.environ)
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("GLIBC_TUNABLES", None)
        else:
            os.environ["GLIBC_TUNABLES"] = before


def _serve_side(conn: Connection, mode: str, model_dir: Path, prompt_tokens: int) -> None:
    """A `--processes` side: its pid once loaded, then a Block per block asked for, until None;
    an error's text instead of an answer, after which it stops."""
    try:
        side = _make_side(mode, model_dir, None, prompt_tokens)
    except Exception as e:
        conn.send(("error", f"{type(e).__name__}: {e}"))
        return
    try:
        conn.send(("ok", os.getpid()))
        while (msg := conn.recv()) is not None:
            try:
                answer: Any = None
                if msg[0] == "block":
                    answer = tuple(_run_block(side, msg[1], msg[2]))
                else:
                    _settle(msg[1], msg[2])
            except Exception as e:
                conn.send(("error", f"{type(e).__name__}: {e}"))
                return
            conn.send(("ok", answer))
    finally:
        gc.unfreeze()
        side.close()


def measure(
    model_dir: Path,
    *,
    concurrency: Sequence[int],
    seconds: float,
    modes: Sequence[str] = MODES,
    processes: bool = False,
    draws: int = 1,
    requests: int = 2,
    prompt_tokens: int = 64,
    output_tokens: int = 64,
    step_cpu: int | None = None,
    max_rounds: int = 10_000,
    make_side: MakeSide = _make_side,
) -> tuple[list[Point], list[dict[str, int]]]:
    """Alternate `modes`' blocks for `seconds` at each concurrency, in this process or
    (`processes`) each in its own: in `draws` parts, each on sides made anew (new processes),
    `max_rounds` at most each. The points, and each draw's process id per mode. In this process,
    `make_side` makes the sides (other modes than this module's); each process makes its own.
    With `step_cpu`, this process's threads are back on their CPUs after each draw."""
    if not processes and (only := set(modes) & (set(PROCESS_MODES) - set(MODES))):
        raise ValueError(f"{', '.join(sorted(only))}: a mode only with processes")
    ids = np.asarray(printable_token_ids(model_dir))
    rng = np.random.default_rng(0)
    whole = frozenset(os.sched_getaffinity(0))
    rest = whole - {step_cpu} if step_cpu is not None else None
    points, pids = [], []
    for c in concurrency:

        def run(sides: _InProcess | _Processes, mode: str, c: int = c) -> Block:
            prompts = [rng.choice(ids, size=(requests, prompt_tokens)).tolist() for _ in range(c)]
            return sides.run(mode, prompts, output_tokens)

        blocks: dict[str, list[Block]] = {m: [] for m in modes}
        drawn: list[int] = []
        for draw in range(draws):
            sides = (
                _Processes(modes, model_dir, prompt_tokens)
                if processes
                else _InProcess(modes, model_dir, prompt_tokens, make_side)
            )
            try:
                pids.append(sides.pids)
                for m in modes:  # each side's first block compiles and allocates
                    run(sides, m)
                sides.settle(step_cpu, rest)
                deadline = time.perf_counter() + seconds / draws
                for _ in range(max_rounds):
                    if time.perf_counter() > deadline:
                        break
                    turn = len(drawn) % len(modes)  # each round starts one mode later
                    for m in [*modes[turn:], *modes[:turn]]:
                        blocks[m].append(run(sides, m))
                    drawn.append(draw)
            finally:
                sides.close()
                if step_cpu is not None:
                    pin_process(whole)
        points.append(Point(c, blocks, tuple(drawn)))
    return points, pids


def to_markdown(
    points: Sequence[Point],
    title: str,
    notes: Sequence[str],
    *,
    processes: bool = False,
    heading: str = "lmx's worker against raw's loop",
) -> str:
    where = "each in a process of its own" if processes else "in one process"
    lines = [
        f"# {heading} {where} — {title}",
        "",
        *notes,
        "",
        "Per block, medians over the rounds: its median decode step (ms, wall and the stepping "
        "thread's CPU time) and the whole block's time (s). Per pair of modes, a's measure over "
        "b's per round (below 1: b took longer; for whole blocks, b's throughput over a's): "
        "median [distribution-free 95% interval], geometric mean, rounds below 1, sign test.",
    ]
    drawn = any(len(set(p.draws)) > 1 for p in points)
    if drawn:
        lines[-1] += (
            " Per draw (sides made anew, each mode's process with a layout of its own): the "
            "medians of its rounds' decode steps (wall), summed up as the rounds are."
        )
    for p in points:
        modes = list(p.blocks)
        lines += [
            "",
            f"## {p.concurrency} stream{'s' if p.concurrency > 1 else ''}, "
            f"{len(p.draws)} rounds" + (f" in {len(set(p.draws))} draws" if drawn else ""),
            "",
            "| mode | decode step ms, wall | CPU | whole block s |",
            "|---|---:|---:|---:|",
        ]
        for m in modes:
            wall, cpu, block = (statistics.median(b[i] for b in p.blocks[m]) for i in range(3))
            lines.append(f"| {m} | {wall:.3f} | {cpu:.3f} | {block:.3f} |")
        columns = [c for _, c in MEASURES] + (["per draw, decode step, wall"] if drawn else [])
        lines += ["", f"| a/b | {' | '.join(columns)} |", f"|---|{'---:|' * len(columns)}"]
        for a, b in itertools.combinations(modes, 2):
            cells = [pair_cell(p.pooled(a, b, i)) for i in range(len(MEASURES))]
            if drawn:
                cells.append(pair_cell(p.by_draw(a, b, 0)))
            lines.append(f"| {a}/{b} | {' | '.join(cells)} |")
    return "\n".join(lines) + "\n"


def pair_cell(s: Pairs) -> str:
    """A pair's cell in the tables: median [interval], geometric mean, rounds below 1, sign
    test."""
    return f"{cell(s, 3)}, {s.geomean:.3f}, {s.below_1} of {s.n} below 1, p = {s.sign_p:.2g}"


def concurrency_arg(p: argparse.ArgumentParser, text: str) -> list[int]:
    """`--concurrency`'s numbers; p.error names a list that is not one."""
    try:
        return [int(c) for c in text.split(",")]
    except ValueError:
        p.error(f"--concurrency: {text!r} is not a list of numbers such as 1,16")


def at_least(p: argparse.ArgumentParser, *checks: tuple[str, float, float]) -> None:
    """p.error names the first (option, value, least) whose value is below its least."""
    for name, value, least in checks:
        if value < least:
            p.error(f"{name}: {value} is below {least}")


def device_label(given: str | None) -> str:
    """The device's part of result files' names: `given`, else MLX's device (e.g. "gpu0")."""
    label = given or str(mx.default_device()).replace("Device(", "").rstrip(")")
    return label.replace(", ", "")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--preset", choices=PRESET_NAMES, default="tiny")
    p.add_argument("--model", type=Path, help="a model directory instead of --preset's")
    p.add_argument("--models-dir", type=Path, default=Path("bench/.models"))
    p.add_argument("--concurrency", default="1,16")
    p.add_argument("--seconds", type=float, default=120.0, help="per concurrency")
    p.add_argument("--max-rounds", type=int, default=10_000, help="per draw")
    p.add_argument("--modes", help="default: every mode (with --processes, tuned too)")
    p.add_argument(
        "--processes",
        action="store_true",
        help="each mode in a process of its own, loading the model itself (default: one process)",
    )
    p.add_argument(
        "--draws",
        type=int,
        default=1,
        help="with --processes: each concurrency's time in this many parts, each in new processes",
    )
    p.add_argument("--requests", type=int, default=2, help="per stream per block")
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--output-tokens", type=int, default=64)
    p.add_argument("--step-cpu", type=int, help="Linux: the stepping thread on this CPU alone")
    p.add_argument("--device-label", help="names the result files (default: from MLX)")
    p.add_argument("--out", type=Path, default=Path("bench/results"))
    args = p.parse_args(argv)
    modes = (
        args.modes.split(",") if args.modes else list(PROCESS_MODES if args.processes else MODES)
    )
    if unknown := set(modes) - set(PROCESS_MODES):
        known = ", ".join(PROCESS_MODES)
        p.error(f"--modes: unknown {', '.join(sorted(unknown))}; known: {known}")
    if not args.processes and (only := set(modes) - set(MODES)):
        only_text = ", ".join(sorted(only))
        p.error(f"--modes: {only_text} needs --processes (malloc settings are a whole process's)")
    if len(modes) < 2:
        p.error("--modes: name two or more")
    concurrency = concurrency_arg(p, args.concurrency)
    at_least(
        p,
        ("--concurrency", min(concurrency), 1),
        ("--requests", args.requests, 1),
        ("--prompt-tokens", args.prompt_tokens, 1),
        ("--output-tokens", args.output_tokens, 2),  # the first token comes from the prompt step
        ("--max-rounds", args.max_rounds, 1),
        ("--draws", args.draws, 1),
    )
    if args.draws > 1 and not args.processes:
        p.error("--draws: needs --processes (in one process, every mode shares its layout)")
    if args.step_cpu is not None:
        if not hasattr(os, "sched_getaffinity"):
            p.error("--step-cpu needs CPU affinity, which this platform does not have (Linux has)")
        cpus = os.sched_getaffinity(0)
        if args.step_cpu not in cpus:
            p.error(f"--step-cpu: {args.step_cpu} is not among this process's CPUs")
        if cpus == {args.step_cpu}:
            p.error(f"--step-cpu: {args.step_cpu} leaves no CPU for the other threads")
    model_dir = args.model or ensure_model(args.preset, args.models_dir)
    label = device_label(args.device_label)
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    points, pids = measure(
        model_dir,
        concurrency=concurrency,
        seconds=args.seconds,
        modes=modes,
        processes=args.processes,
        draws=args.draws,
        requests=args.requests,
        prompt_tokens=args.prompt_tokens,
        output_tokens=args.output_tokens,
        step_cpu=args.step_cpu,
        max_rounds=args.max_rounds,
    )
    title = f"`{args.preset if args.model is None else model_dir.name}` on `{label}`"
    pinned = "" if args.step_cpu is None else f"; the stepping thread on CPU {args.step_cpu}"
    where = (
        "each mode in a process of its own, which loaded the model itself"
        + (f", in {args.draws} draws of new processes per concurrency" if args.draws > 1 else "")
        if args.processes
        else "every mode in one process, on one copy of the model"
    )
    notes = [
        f"Run {started}; {args.requests} requests per stream per block, {args.prompt_tokens} "
        f"prompt and {args.output_tokens} output tokens, greedy, EOS ignored; {where}{pinned}."
    ]
    tunables = (
        {m: mode_tunables(m, os.environ) for m in modes}
        if args.processes and platform.libc_ver()[0] == "glibc"
        else None
    )
    if tunables:
        notes.append(
            "GLIBC_TUNABLES of each mode's process: "
            + "; ".join(f"{m} `{t}`" if t else f"{m} glibc's defaults" for m, t in tunables.items())
            + "."
        )
    data = {
        "model": str(model_dir.name),
        "device": label,
        "started_at": started,
        "settings": {
            "requests": args.requests,
            "prompt_tokens": args.prompt_tokens,
            "output_tokens": args.output_tokens,
            "modes": modes,
            "processes": args.processes,
            "draws": args.draws,
            "step_cpu": args.step_cpu,
            "glibc_tunables": tunables,
        },
        "pids": pids,
        "points": [pt.to_json() for pt in points],
    }
    stem = args.out / f"worker-ab-{model_dir.name if args.model else args.preset}-{label}"
    markdown = to_markdown(points, title, notes, processes=args.processes)
    for path in write_result(stem, data, markdown, {}):
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
