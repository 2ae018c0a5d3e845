"""The MLX worker process: one model, continuous batching, every MLX call on its main thread.

`lmx.runtime.mlx_engine` starts one per loaded model (`python -m lmx.runtime.mlx_worker FD`) and
talks to it over a socket pair with pickled tuples (see `lmx.runtime.worker_protocol`). The
process has a GIL of its own, so the daemon's HTTP work never delays a decode step; a crash here
fails this model's requests and leaves the daemon serving; its exit returns all of its memory.

New requests join the running batch at the next step; a cancelled one leaves it at the next step.
Text (detokenization, stop strings) is produced here, on an output thread of its own while the
main thread runs the next step (see Worker._emit_all): a stop string ends its text at once, and
its sequence leaves the batch before the next step or the one after.
"""

from __future__ import annotations

import contextlib
import gc
import json
import pickle
import queue
import signal
import sys
import threading
import time
from collections import Counter, deque
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from multiprocessing.connection import Connection
from typing import Any

import mlx.core as mx
import numpy as np
import structlog
from mlx.utils import tree_flatten
from mlx_lm import load as mlx_load
from mlx_lm.generate import BatchGenerator
from mlx_lm.models.cache import make_prompt_cache

from lmx.logs import configure
from lmx.runtime.engine import Delta, Embeddings, GenerationRequest, LoadConfig, TokenLogprob
from lmx.runtime.intake import COMING_FOR_S, MAX_HOLD_S
from lmx.runtime.mlx_constraint import ConstrainedProcessor, ConstraintFactory
from lmx.runtime.mlx_embedding import Pooling, embed_rows, hidden_states_model, pooling_of
from lmx.runtime.mlx_prompt_cache import PromptCache, take_out
from lmx.runtime.mlx_sampling import make_processors, make_sampler, thinking_budget
from lmx.runtime.mlx_tokenizer import MlxTokenizer
from lmx.runtime.parsers import Thinking, opens_thinking
from lmx.runtime.scheduling import run_as_worker, yield_to_workers
from lmx.runtime.steptrace import Arrival, TraceLog, step_of, switches, switches_between
from lmx.runtime.store import context_tokens
from lmx.runtime.textstream import ByteDecoder, IncrementalDecoder, StopMatcher
from lmx.runtime.worker_protocol import Command, Piece, Ready, Report, WorkerStats, receive, send

log = structlog.get_logger(__name__)

_IDLE_POLL_S = 0.5
# Requests that arrive together share one prefill: a prefill is a forward pass of its own that
# every decoding sequence waits for, and a later arrival would need another. Two rules:
# - Requests that ended in the last _ROUND_S and that no new request followed yet predict as
#   many new ones (a request is a client's: its n choices and prompts are one, see _arrived and
#   _left): clients that send their next request when the last one ends (agents, scripts,
#   batch jobs) come a few ms apart over HTTP, the more of them the longer the last takes. New
#   prompts stay out of the batch while such followers are still due and keep coming: no gap over
#   _FOLLOW_GAP_S, _FOLLOW_MAX_S at most after the first, whether or not a batch is decoding
#   meanwhile. Streams that ended a few steps apart so start together again, instead of each
#   group's next requests stalling the others with prefills of their own round after round.
#   The daemon prepares requests one after another on its event loop, so a round of 32 reaches
#   the worker over more than 50 ms (H200 host; 100-150 ms on a 2-core CPU), in messages up to
#   the intake's hold (lmx.runtime.intake) apart: the gap allowed exceeds that hold, and
#   _FOLLOW_MAX_S spans such a round.
# - Otherwise an idle batch waits for a pause of _BURST_PAUSE_S in arrivals, _BURST_MAX_S at most,
#   and while the daemon says it is still preparing requests (lmx.runtime.intake), until it says
#   none is, _FOLLOW_MAX_S at most: the daemon prepares a burst one request after another, and
#   the intake's hold ends before the last is ready (an H200 run's first round of 32: 1 request
#   alone in a prompt step of 138 ms, 30 in the next, 1 after). A lone request waits for nothing
#   more.
_ROUND_S = 0.25
_FOLLOW_GAP_S = MAX_HOLD_S + 0.015
_FOLLOW_MAX_S = COMING_FOR_S  # the intake counts a request as coming for as long
_BURST_PAUSE_S = 0.0015
_BURST_MAX_S = 0.01
_PROMPT_CACHE_ENTRIES = 64
# Prompts prefilled together in one step: at least this many, and more while the group's padded
# tokens (members x the longest member's chunk) stay within this many prefill chunks.
_PREFILL_GROUP = 8
_STATS_EVERY_S = 0.1  # memory counters and KV bytes ride along with deltas at most this often
# Steps whose output the output thread may have still to send before the main thread waits for it
# (Worker._behind): a sequence whose text hit a stop string takes this many extra steps at most.
_OUTPUT_LAG = 2
_LOGPROB_FLOOR = -9999.0  # the logprob reported for a token that cannot be drawn
_SCORE_CHUNK = 256  # prompt tokens a scoring pass takes at once: 256 x vocabulary float32 logits


def _params(model: Any) -> list[tuple[str, Any]]:
    flat: list[tuple[str, Any]] = tree_flatten(model.parameters())  # type: ignore[assignment]
    return flat


@dataclass(eq=False)
class _Seq:
    """One sequence of the batch."""

    sid: int  # the engine's id for the stream
    request: GenerationRequest
    detok: ByteDecoder | IncrementalDecoder
    stops: StopMatcher
    uid: int = -1  # BatchGenerator's id
    prompt_left: int = 0  # prompt tokens still to go through the model
    generated: int = 0
    cached_tokens: int = 0  # the prompt's tokens the prompt cache held
    # Where asked for (prompt_logprobs): its prompt's tokens after the first, scored.
    prompt_lps: tuple[TokenLogprob, ...] = ()
    stop_ids: frozenset[int] = field(default_factory=frozenset)
    constraint: ConstrainedProcessor | None = None
    # perf_counter times: the add arrived; the prefill began; the first token came.
    received_s: float = 0.0
    started_s: float | None = None
    first_token_s: float | None = None
    timed: bool = False  # the timings rode on a delta already
    done: bool = False  # its last delta went out (the output thread's)


@dataclass(eq=False)
class _Embedding:
    """One embedding request: its rows go through the model shortest first, a batch at a time
    between the batch's steps."""

    sid: int
    rows: tuple[tuple[int, ...], ...]
    order: list[int]  # row indices, shortest first
    done: int = 0  # rows of `order` embedded
    vectors: dict[int, np.ndarray] = field(default_factory=dict)  # by row index


# One sequence's token of one step, as the main thread hands it to the output thread: the
# sequence, the token, BatchGenerator's finish reason, the sequence's tokens so far, logprobs.
_Token = tuple[_Seq, int, str | None, int, tuple[TokenLogprob, ...]]


@dataclass(frozen=True)
class _StepOutput:
    tokens: list[_Token]
    stats: WorkerStats
    changed: bool  # the batch's size changed: the stats go out even without text


class Worker:
    """Owns the model, the BatchGenerator and the prompt cache; runs until told to stop."""

    def __init__(self, config: LoadConfig, conn: Connection) -> None:
        self.config = config
        self._conn = conn
        # (arrival time, commands); one message's commands are applied together
        self._inbox: queue.SimpleQueue[tuple[float, list[Command]]] = queue.SimpleQueue()
        self._live: dict[int, _Seq] = {}  # by BatchGenerator uid
        self._by_sid: dict[int, _Seq] = {}
        self._requests: Counter[str] = Counter()  # sequences in the batch per request_id
        self._steps = self._prefill_steps = 0
        self._step_s = self._overhead_s = 0.0
        self._generated = 0
        self._kv_bytes = 0
        self._mlx_bytes = (0, 0)  # MLX's active and cache memory
        self._stats_at = 0.0
        self._reported_active = -1
        self._weights_bytes = 0
        self._prompts = PromptCache(config.prompt_cache_bytes, _PROMPT_CACHE_ENTRIES)
        # LMX_STEP_TRACE_DIR: a line per step, and one per request taken in, for bench/
        self._trace = TraceLog.from_env("steps")
        self._arrivals = TraceLog.from_env("arrivals")
        # When sequences finished, oldest first, less one for each request that came after them.
        self._ended: deque[float] = deque(maxlen=config.max_batch)
        # To the output thread, in order: steps' outputs and whole messages; None ends it.
        self._outbox: queue.SimpleQueue[_StepOutput | Report | None] = queue.SimpleQueue()
        # Step outputs posted (the main thread's count) and sent (the output thread's), and the
        # latest whose first tokens are sent
        self._output = threading.Condition()
        self._posted = self._sent = self._firsts_sent = 0
        self._output_failed = False
        # From the output thread: sequences whose text ended (a stop string, or an error making
        # it), for the main thread to take out of the batch.
        self._text_ended: deque[_Seq] = deque()
        self._embeds: deque[_Embedding] = deque()  # oldest first
        self._pooling = Pooling.MEAN
        self._unembeddable: str | None = None  # why this model gives no embeddings
        self._think: Thinking | None = None  # how its reasoning opens and ends, if it has any

    def run(self) -> None:
        output = threading.Thread(target=self._emit_all, name="output")
        output.start()
        try:
            self._run()
        finally:  # every message posted goes out before the process exits
            self._outbox.put(None)
            output.join()

    def _run(self) -> None:
        try:
            model, wrapper, gen, ready = self._load()
        except Exception as exc:  # reported to the engine's load(), which raises it
            self._post(("failed", _portable(exc)))
            return
        self._warn_if_slow(model)
        self.tokenizer = MlxTokenizer(wrapper, self.config, ready.marker_ids)
        self._think = self.tokenizer.thinking
        # The model, tokenizer and imports live as long as the process: take them out of the
        # collector's view, or each full collection walks them all inside a decode step (~60 ms
        # for the built-in tiny model's worker on a loaded 2-core machine).
        gc.collect()
        gc.freeze()
        threading.Thread(target=self._read, name="commands", daemon=True).start()
        self._post(("ready", ready))
        try:
            self._serve(gen)
        finally:  # the process exits next, which returns every byte
            self._fail_all(gen, "the model was unloaded", retryable=True)
            for job in self._embeds:
                self._post(("embed_failed", job.sid, "the model was unloaded", False))
            gen.close()
            self._flush_logs()

    def _load(self) -> tuple[Any, Any, Any, Ready]:
        loaded: Any = mlx_load(str(self.config.path))
        model, wrapper = loaded[0], loaded[1]
        model_config = json.loads((self.config.path / "config.json").read_text())
        vocab_size = int(model_config["vocab_size"])
        self._constraints = ConstraintFactory(wrapper, vocab_size, wrapper.eos_token_ids)
        self._model = model
        self._weights_bytes = sum(int(v.nbytes) for _, v in _params(model))
        try:
            self._pooling = pooling_of(self.config.path)
        except (ValueError, OSError) as exc:  # the model serves text all the same
            self._unembeddable = str(exc)
        if hidden_states_model(model) is None:
            kind = model_config.get("model_type", "?")
            self._unembeddable = f"its architecture ({kind}) gives no hidden states to pool"
        gen: Any = BatchGenerator(  # the worker ends its sequences itself: see _step
            model,
            completion_batch_size=self.config.max_batch,
            prefill_batch_size=min(_PREFILL_GROUP, self.config.max_batch),
            prefill_step_size=self.config.prefill_step,
            stream=mx.new_stream(mx.default_device()),
        )
        ready = Ready(
            context_length=context_tokens(model_config, self.config.context_length),
            vocab_size=vocab_size,
            marker_ids=self._constraints.marker_ids,
            device=str(mx.default_device()),
            stats=self._stats(gen),
        )
        return model, wrapper, gen, ready

    def _warn_if_slow(self, model: Any) -> None:
        dtypes = {str(v.dtype) for _, v in _params(model)}
        if mx.default_device() == mx.cpu and dtypes - {"mlx.core.float32"}:
            log.warning(
                "cpu_backend_slow",
                model=self.config.model_id,
                dtypes=sorted(dtypes),
                hint="MLX on the CPU runs bf16 and quantized weights slowly; expect a few tok/s",
            )

    def _read(self) -> None:
        """The command reader: the engine's messages into the inbox; its end (EOF) means stop."""
        try:
            while True:
                cmds: list[Command] = receive(self._conn)
                self._inbox.put((time.perf_counter(), cmds))
                if ("stop",) in cmds:
                    return
        except (EOFError, OSError):  # the daemon is gone: nobody to serve
            self._inbox.put((time.perf_counter(), [("stop",)]))

    def _serve(self, gen: Any) -> None:
        while True:
            # Step at once while anything runs or waits unheld; with only held prompts, wait for
            # the rest of their round; idle, for anything. The commands change all three.
            hold = 0.0 if self._running() or self._embeds else self._hold_s()
            wait = hold if hold else 0.0 if self._live or self._embeds else _IDLE_POLL_S
            if not self._serve_once(gen, wait):
                return

    def _serve_once(self, gen: Any, wait: float) -> bool:
        """One pass of the serving loop: the commands (waiting up to `wait` s for the first),
        a batch of embedding rows if any wait, then a step unless the batch is empty or held;
        False once told to stop."""
        if not self._take_commands(gen, wait):
            return False
        self._retire(gen)
        if self._embeds:
            self._embed_some(gen)
        hold = self._hold_s()
        if self._live and (not hold or self._running()):
            try:
                self._step(gen, held=hold > 0)
            except Exception as exc:  # the batch is unusable: fail its requests, go on
                log.exception("batch_step_failed", model=self.config.model_id)
                self._fail_all(gen, str(exc))
        if not self._live:  # idle, or from this step on: the logs for bench/ go to disk now
            if self._reported_active:
                self._post(("out", [], [], self._stats(gen)))
            self._flush_logs()
        return True

    def _flush_logs(self) -> None:
        for trace in (self._trace, self._arrivals):
            if trace is not None:
                trace.flush()

    def _take_commands(self, gen: Any, wait: float) -> bool:
        """Apply every queued command, waiting up to `wait` s for the first; if the batch was idle
        and no followers are due (see _ROUND_S), also those of a burst still arriving or still
        being prepared. False once told to stop."""
        idle = not self._live
        try:
            at, cmds = self._inbox.get(timeout=wait) if wait > 0 else self._inbox.get_nowait()
        except queue.Empty:
            return True
        burst = idle and not self._due(at)
        first_at = at
        while True:
            coming = 0  # requests the daemon was still preparing when it sent these
            for cmd in cmds:
                match cmd:
                    case ("stop",):
                        return False
                    case ("add", int(sid), GenerationRequest() as request):
                        if self._arrived(request):
                            self._followed(at)
                        if self._arrivals is not None:
                            self._arrivals.write(Arrival(at, "worker"))
                        self._add(gen, sid, request, at)
                    case ("embed", int(sid), tuple(rows)):
                        self._embed_take(sid, rows)
                    case ("cancel", int(sid)):
                        if self._arrivals is not None:
                            self._arrivals.write(Arrival(at, "cancel"))
                        self._embeds = deque(j for j in self._embeds if j.sid != sid)
                        seq = self._by_sid.pop(sid, None)
                        if seq is not None:
                            self._left(seq)  # not an ending: nobody will follow it
                            if seq.uid in self._live:
                                gen.remove([seq.uid])
                                del self._live[seq.uid]
                    case ("coming", int(n)):
                        coming = n
            now = time.perf_counter()
            if not burst:
                pause = 0.0
            elif coming:
                pause = first_at + _FOLLOW_MAX_S - now
            else:
                pause = min(_BURST_PAUSE_S, first_at + _BURST_MAX_S - now)
            try:
                at, cmds = self._inbox.get(timeout=pause) if pause > 0 else self._inbox.get_nowait()
            except queue.Empty:
                return True

    def _running(self) -> bool:
        """A sequence of the batch is decoding or partway through its prompt."""
        return any(s.started_s is not None for s in self._live.values())

    def _due(self, now: float) -> int:
        """Requests that ended within _ROUND_S before `now` and that no request followed yet."""
        return sum(1 for t in self._ended if t >= now - _ROUND_S)

    def _hold_s(self) -> float:
        """How much longer the prompts not yet started stay out of the batch (0: not at all),
        while followers of recent endings are due: see follow_hold_s."""
        arrivals = [s.received_s for s in self._live.values() if s.started_s is None]
        now = time.perf_counter()
        if not arrivals or not self._due(now):
            return 0.0
        return follow_hold_s(arrivals, self._ended[-1], now)

    def _followed(self, at: float) -> None:
        """A request came at `at`: it follows the oldest ending still waiting for one."""
        while self._ended and self._ended[0] < at - _ROUND_S:
            self._ended.popleft()  # too long ago to be followed
        if self._ended:
            self._ended.popleft()

    def _arrived(self, request: GenerationRequest) -> bool:
        """A sequence of `request` came; True if it is the request's first (a new request)."""
        if not request.request_id:
            return True
        self._requests[request.request_id] += 1
        return self._requests[request.request_id] == 1

    def _left(self, seq: _Seq) -> bool:
        """`seq` left the batch; True if it was the last of its request (the request ended)."""
        rid = seq.request.request_id
        if not rid:
            return True
        self._requests[rid] -= 1
        if self._requests[rid] > 0:
            return False
        del self._requests[rid]
        return True

    def _add(self, gen: Any, sid: int, request: GenerationRequest, received_s: float) -> None:
        seq = _Seq(
            sid=sid,
            request=request,
            detok=self.tokenizer.detokenizer(request.prompt_tokens),
            stops=StopMatcher(request.params.stop),
            received_s=received_s,
        )
        try:
            if request.params.max_tokens == 0:  # its prompt scored, nothing to generate
                self._scored_only(gen, seq)
                return
            self._insert(gen, seq)
        except Exception as exc:  # this request only: an error delta, the batch goes on
            log.warning("request_rejected", model=self.config.model_id, error=str(exc))
            self._left(seq)
            final = self._final(seq, "error", str(exc), 0)
            self._post(("out", [], [(sid, final)], self._stats(gen)))
            return
        self._by_sid[sid] = seq

    def _insert(self, gen: Any, seq: _Seq) -> None:
        req = seq.request
        p = req.params
        eos = self.tokenizer.eos_token_ids
        # A finished grammar allows only EOS, so a constrained request always stops on it.
        ignore_eos = p.ignore_eos and req.constraint is None
        seq.stop_ids = frozenset(p.stop_token_ids) | (frozenset() if ignore_eos else eos)
        tokens = list(req.prompt_tokens)
        kv, rest = (None, tokens)
        if p.prompt_logprobs and len(tokens) > 1:  # the scoring pass fills the cache too
            kv, seq.prompt_lps = self._score(gen, tokens, p.top_logprobs)
            rest = tokens[-1:]
        elif self.config.prompt_cache_bytes > 0:
            kv, rest = self._prompts.fetch(tokens)
            seq.cached_tokens = len(tokens) - len(rest)
        procs = make_processors(p, sorted(eos))
        # A grammar's output is the answer from its first token: no thinking to end.
        if p.thinking_budget is not None and self._think is not None and req.constraint is None:
            inside = opens_thinking(tokens, self._think)
            procs.append(thinking_budget(p.thinking_budget, self._think, inside=inside))
        if req.constraint is not None:
            seq.constraint = self._constraints.make_processor(
                req.constraint.grammar, on_error="end"
            )
            procs.append(seq.constraint)
        seq.prompt_left = len(rest)
        (seq.uid,) = gen.insert(
            [rest],
            max_tokens=[p.max_tokens + 1],  # one more than it will get: see _step
            caches=[kv] if kv is not None else None,
            all_tokens=[tokens[: len(tokens) - len(rest)]],
            samplers=[make_sampler(p)],  # None entries fall back to the batch's greedy sampler
            logits_processors=[procs],
        )
        self._live[seq.uid] = seq

    def _scored_only(self, gen: Any, seq: _Seq) -> None:
        """A request for no tokens: its prompt's logprobs (if asked for) in its only delta."""
        self._left(seq)
        p, tokens = seq.request.params, list(seq.request.prompt_tokens)
        if p.prompt_logprobs and len(tokens) > 1:
            _, seq.prompt_lps = self._score(gen, tokens, p.top_logprobs)
        final = replace(self._final(seq, "length", None, 0), prompt_logprobs=seq.prompt_lps)
        self._post(("out", [], [(seq.sid, final)], self._stats(gen)))

    def _score(
        self, gen: Any, tokens: list[int], top: int
    ) -> tuple[list[Any], tuple[TokenLogprob, ...]]:
        """Each of `tokens` after the first: its logprob given those before it, with the `top`
        likeliest; and the KV cache of all but the last token, which the batch can go on from.
        One forward pass over the prompt, in chunks, on the stepping thread (the batch waits)."""
        cache = make_prompt_cache(self._model)
        scored: list[TokenLogprob] = []
        with mx.stream(gen.stream):
            for start in range(0, len(tokens) - 1, _SCORE_CHUNK):
                ids = tokens[start : start + _SCORE_CHUNK + 1]
                logits = self._model(mx.array(ids[:-1])[None], cache=cache)[0].astype(mx.float32)
                logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
                scored += self._token_logprobs(ids[1:], logprobs, top)
        return cache, tuple(scored)

    def _step(self, gen: Any, *, held: bool) -> None:
        """One BatchGenerator step; `held`: the prompts not yet started stay out of it. Its
        tokens go to the output thread, which makes their text while the next step runs.

        The worker ends sequences itself (a stop token, max_tokens), not BatchGenerator: its
        ending cuts each sequence's KV cache out on its own (see lmx.runtime.mlx_prompt_cache),
        while take_out cuts those of all the sequences a step ends together, into one buffer."""
        waiting = [s.prompt_left for s in self._live.values() if s.started_s is None]
        if waiting:  # else the step takes no prompt in, whatever the group
            gen.prefill_batch_size = 0 if held else self._prefill_group(waiting)
        # The CPU clock read inside the wall clock's span: work between the two reads (a garbage
        # collection) counts in the step's wall time, never in its CPU time alone. The context
        # switches, for the trace alone, are read outside it.
        sw0 = switches() if self._trace is not None else None
        t0, c0 = time.perf_counter(), time.thread_time()
        prompts, responses = gen.next()
        c1, t1 = time.thread_time(), time.perf_counter()
        sw1 = switches() if sw0 is not None else None
        self._step_s += t1 - t0
        self._steps += 1
        if prompts:
            self._prefill_steps += 1
        for p in prompts:  # progress of prefills: the first one of a sequence marks its start
            seq = self._live.get(p.uid)
            if seq is not None:
                if seq.started_s is None:
                    seq.started_s = t0
                done, total = p.progress
                seq.prompt_left = total - done
        tokens: list[_Token] = []
        finished: list[int] = []
        first = False  # a sequence's first token
        for r in responses:
            seq = self._live.get(r.uid)
            if seq is None:  # its text ended (a stop string) or it was cancelled
                continue
            if seq.first_token_s is None:
                seq.first_token_s = t1
                first = True
            seq.generated += 1
            self._generated += 1
            p = seq.request.params
            finish = self._finish(seq, r.token)
            lps = (  # none for a stop token: it is not part of the answer, nor is its text
                self._token_logprobs([r.token], r.logprobs[None], p.top_logprobs)
                if p.logprobs and finish != "stop"
                else ()
            )
            if finish is not None:
                self._leave(seq, t1)
                finished.append(seq.uid)
            tokens.append((seq, r.token, finish, seq.generated, lps))
        changed = len(self._live) != self._reported_active
        if tokens or changed:
            self._behind(_OUTPUT_LAG - 1)
            self._posted += 1
            self._outbox.put(_StepOutput(tokens, self._stats(gen), changed))
        # Clients wait for these: a last token (their next request), a first one (their time to
        # it). Out before this thread goes on: the output thread needs the GIL, which storing the
        # caches holds 5 ms at a time, and building the next step until it launches the step's
        # kernels (on a GPU a first token left half a step's time after it came).
        if finished:
            self._behind(0)
        elif first:
            self._firsts_out()
        cache_s = 0.0
        if finished:
            tc = time.perf_counter()
            self._take_out(gen, finished)
            cache_s = time.perf_counter() - tc
        t2 = time.perf_counter()
        self._overhead_s += t2 - t1
        if self._trace is not None:
            after_ms = (t2 - t1) * 1e3
            cpu_ms = (c1 - c0) * 1e3
            switched = switches_between(sw0, sw1)
            step = step_of(t0, t1, prompts, responses, after_ms, cache_s * 1e3, cpu_ms, switched)
            self._trace.write(step)

    @staticmethod
    def _finish(seq: _Seq, token: int) -> str | None:
        """Why `seq` ends with `token`, its latest, if it does."""
        if token in seq.stop_ids:
            return "stop"
        return "length" if seq.generated >= seq.request.params.max_tokens else None

    def _leave(self, seq: _Seq, now: float) -> None:
        """`seq` is out of the batch (BatchGenerator's part is the caller's)."""
        del self._live[seq.uid]
        self._by_sid.pop(seq.sid, None)
        if self._left(seq):
            self._ended.append(now)

    def _retire(self, gen: Any) -> None:
        """Take the sequences whose text the output thread ended out of the batch."""
        ended: list[int] = []
        while self._text_ended:
            seq = self._text_ended.popleft()
            if self._live.get(seq.uid) is seq:  # else it finished or was cancelled meanwhile
                self._leave(seq, time.perf_counter())
                ended.append(seq.uid)
        if ended:
            self._take_out(gen, ended)

    def _emit_all(self) -> None:
        """The output thread: makes each step's text and sends it, and sends the main thread's
        messages, in the order posted. It runs while the main thread is in MLX's calls, which
        release the GIL (on a GPU, most of a step goes to launching its kernels), so that the
        step's results cost the stepping thread a handoff instead of their text and message.
        It runs under SCHED_BATCH: woken every step, it takes no core from MLX's threads
        (lmx.runtime.scheduling). Should it fail, the worker stops: the engine then ends the
        model's streams."""
        yield_to_workers()
        try:
            while (item := self._outbox.get()) is not None:
                if not isinstance(item, _StepOutput):
                    self._send(item)
                    continue
                self._emit(item)
                with self._output:
                    self._sent += 1
                    self._output.notify()
        except Exception:
            log.exception("worker_output_failed", model=self.config.model_id)
            self._inbox.put((time.perf_counter(), [("stop",)]))
            with self._output:  # before its next step, the main thread sees the stop
                self._output_failed = True
                self._output.notify()

    def _behind(self, steps: int) -> None:
        """Wait until the output thread has at most `steps` step outputs still to send (the main
        thread's)."""
        with self._output:
            self._output.wait_for(lambda: self._posted - self._sent <= steps or self._output_failed)

    def _firsts_out(self) -> None:
        """Wait until the output thread has sent the first tokens of the latest step output."""
        with self._output:
            n = self._posted
            self._output.wait_for(lambda: self._firsts_sent >= n or self._output_failed)

    def _emit(self, step: _StepOutput) -> None:
        """Send a step's text; its first tokens first, in a message of their own when it has
        others, for the main thread waits for them (`_firsts_out`)."""
        firsts = [t for t in step.tokens if t[3] == 1]  # the sequence's first generated token
        if not firsts:
            self._emit_tokens(step.tokens, step.stats, step.changed)
            return
        self._emit_tokens(firsts, step.stats, step.changed)
        with self._output:
            self._firsts_sent = self._sent + 1
            self._output.notify()
        if len(firsts) < len(step.tokens):
            self._emit_tokens([t for t in step.tokens if t[3] != 1], step.stats, False)

    def _emit_tokens(self, tokens: list[_Token], stats: WorkerStats, changed: bool) -> None:
        pieces: list[Piece] = []
        out: list[tuple[int, Delta]] = []
        for seq, token, finish, generated, lps in tokens:
            if seq.done:  # its text ended at an earlier step
                continue
            try:
                text, stop = self._text(seq, token, finish)
            except Exception as exc:  # this sequence only: an error delta, the batch goes on
                log.exception("sequence_text_failed", model=self.config.model_id)
                seq.done = True
                self._text_ended.append(seq)
                out.append((seq.sid, self._final(seq, "error", str(exc), generated)))
                continue
            if stop is not None:
                finish = "stop"
                self._text_ended.append(seq)
            if finish is not None:
                seq.done = True
                error = seq.constraint.error if seq.constraint is not None else None
                final = self._final(seq, finish, error, generated, text, token, lps, stop)
                out.append((seq.sid, self._timed(seq, final)))
            elif lps or (text and not seq.timed):
                delta = Delta(text=text, token_ids=(token,), logprobs=lps)
                out.append((seq.sid, self._timed(seq, delta)))
            elif text:
                pieces.append((seq.sid, text, token))
        if pieces or out or changed:
            self._send(("out", pieces, out, stats))

    def _text(self, seq: _Seq, token: int, finish: str | None) -> tuple[str, str | None]:
        """`token`'s text for `seq` (none for a stop token that ended it, or a special token the
        text leaves out), and the stop string it completed if any (the text then ends before
        it)."""
        ended = finish == "stop" and token in seq.stop_ids
        text = "" if ended or token in self.tokenizer.hidden_ids else seq.detok.add(token)
        if finish is not None:
            text += seq.detok.flush()
        text, stop = seq.stops.feed(text)
        if finish is not None and stop is None:
            text += seq.stops.flush()
        return text, stop

    def _prefill_group(self, waiting: list[int]) -> int:
        """How many of the `waiting` prompts the next step may take into its prefill."""
        if any(s.started_s is not None and s.prompt_left > 1 for s in self._live.values()):
            # A long prompt has chunks to go: newcomers would be padded to its chunk.
            return min(_PREFILL_GROUP, self.config.max_batch)
        return prefill_group(waiting, self.config.prefill_step, self.config.max_batch)

    @staticmethod
    def _timed(seq: _Seq, delta: Delta) -> Delta:
        """`delta` with the sequence's queue and prefill times if no earlier delta carried them."""
        if seq.timed or seq.first_token_s is None:
            return delta
        seq.timed = True
        started = seq.received_s if seq.started_s is None else seq.started_s
        return replace(
            delta,
            queue_s=started - seq.received_s,
            prefill_s=seq.first_token_s - started,
            prompt_logprobs=seq.prompt_lps,
        )

    def _take_out(self, gen: Any, uids: list[int]) -> None:
        """Take `uids`, which left `_live`, out of the batch, their KV caches into the prompt
        cache; then the cache's new size to the engine."""
        if self.config.prompt_cache_bytes <= 0:
            gen.remove(uids)
            return
        self._prompts.store(take_out(gen, uids, gen.stream, self._prompts.gather_bytes).values())
        self._post(("out", [], [], self._stats(gen)))

    def _stats(self, gen: Any) -> WorkerStats:
        now = time.monotonic()
        if now - self._stats_at >= _STATS_EVERY_S or not self._live:
            self._stats_at = now
            self._kv_bytes = gen.prompt_cache_nbytes
            self._mlx_bytes = int(mx.get_active_memory()), int(mx.get_cache_memory())
        self._reported_active = len(self._live)
        return WorkerStats(
            active=len(self._live),
            steps=self._steps,
            prefill_steps=self._prefill_steps,
            generated_tokens=self._generated,
            weights_bytes=self._weights_bytes,
            kv_bytes=self._kv_bytes,
            prompt_cache_bytes=self._prompts.nbytes,
            mlx_active_bytes=self._mlx_bytes[0],
            mlx_cache_bytes=self._mlx_bytes[1],
            step_s=self._step_s,
            overhead_s=self._overhead_s,
        )

    def _token_logprobs(
        self, tokens: list[int], logprobs: mx.array, k: int
    ) -> tuple[TokenLogprob, ...]:
        """Each of `tokens` with its logprob and the `k` likeliest tokens in its place, from
        `logprobs` (a row over the vocabulary per token)."""
        tok = self.tokenizer
        index = mx.array(tokens)[:, None]
        chosen: list[float] = mx.take_along_axis(logprobs, index, axis=-1)[:, 0].tolist()  # type: ignore[assignment]
        ids: list[list[int]] = [[] for _ in tokens]
        values: list[list[float]] = [[] for _ in tokens]
        if k > 0:
            idx = mx.argpartition(-logprobs, kth=k - 1, axis=-1)[:, :k]
            ids = idx.tolist()  # type: ignore[assignment]
            values = mx.take_along_axis(logprobs, idx, axis=-1).tolist()  # type: ignore[assignment]
        out = []
        for token, lp, top_ids, top_values in zip(tokens, chosen, ids, values, strict=True):
            # A token a grammar forbids has probability 0: JSON has no -inf, OpenAI says -9999.
            top_values = [max(v, _LOGPROB_FLOOR) for v in top_values]
            pairs = sorted(zip(top_ids, top_values, strict=True), key=lambda x: -x[1])
            top = tuple(
                (s, v, tuple(s.encode())) for s, v in ((tok.decode([i]), v) for i, v in pairs)
            )
            text = tok.decode([token])
            out.append(TokenLogprob(text, max(lp, _LOGPROB_FLOOR), tuple(text.encode()), top))
        return tuple(out)

    @staticmethod
    def _final(
        seq: _Seq,
        finish: str,
        error: str | None,
        generated: int,
        text: str = "",
        token: int | None = None,
        lps: tuple[TokenLogprob, ...] = (),
        stop: str | None = None,
    ) -> Delta:
        return Delta(
            text=text,
            token_ids=() if token is None else (token,),
            logprobs=lps,
            finish_reason=finish,
            prompt_tokens=len(seq.request.prompt_tokens),
            completion_tokens=generated,
            cached_tokens=seq.cached_tokens,
            error=error,
            stop=stop,
        )

    def _embed_take(self, sid: int, rows: tuple[tuple[int, ...], ...]) -> None:
        if self._unembeddable is not None:
            why = f"model {self.config.model_id!r} cannot embed: {self._unembeddable}"
            self._post(("embed_failed", sid, why, True))
            return
        order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
        self._embeds.append(_Embedding(sid, rows, order))

    def _embed_some(self, gen: Any) -> None:
        """The oldest embedding request's next rows through the model, as many as fit one prefill
        chunk padded (one row at least, in chunks if longer); answered once all are done."""
        job = self._embeds[0]
        chunk = self.config.prefill_step
        take = job.order[job.done : job.done + 1]
        for i in job.order[job.done + 1 :]:
            if (len(take) + 1) * len(job.rows[i]) > chunk:  # shortest first: i is the widest
                break
            take.append(i)
        try:
            with mx.stream(gen.stream):
                vectors = embed_rows(
                    self._model, [list(job.rows[i]) for i in take], self._pooling, chunk
                )
        except Exception as exc:
            log.exception("embedding_failed", model=self.config.model_id)
            self._embeds.popleft()
            self._post(("embed_failed", job.sid, f"{type(exc).__name__}: {exc}", False))
            return
        job.vectors.update(zip(take, vectors, strict=True))
        job.done += len(take)
        if job.done == len(job.rows):
            self._embeds.popleft()
            matrix = np.stack([job.vectors[i] for i in range(len(job.rows))]).astype("<f4")
            tokens = sum(len(r) for r in job.rows)
            count, dimensions = matrix.shape
            answer = Embeddings(matrix.tobytes(), count, dimensions, tokens)
            self._post(("embedded", job.sid, answer))

    def _fail_all(self, gen: Any, error: str, *, retryable: bool = False) -> None:
        """End every sequence with `error`; `retryable`: the model goes, none failed."""
        if self._live:
            gen.remove(list(self._live))
        failed = [
            (s.sid, replace(self._final(s, "error", error, s.generated), retryable=retryable))
            for s in self._live.values()
        ]
        self._live.clear()
        self._by_sid.clear()
        self._requests.clear()
        if failed:
            self._post(("out", [], failed, self._stats(gen)))

    def _post(self, msg: Report) -> None:
        """`msg` to the engine, by the output thread, after every step output posted before it."""
        self._outbox.put(msg)

    def _send(self, msg: Report) -> None:  # the output thread's
        with contextlib.suppress(OSError):  # the daemon is gone; the reader thread stops the loop
            send(self._conn, msg)


def prefill_group(waiting: Sequence[int], chunk: int, max_batch: int) -> int:
    """How many of the `waiting` prompts (their token counts, oldest first) to prefill in one
    step: `_PREFILL_GROUP`, or more while the padded group (members x the longest member's first
    chunk) stays within `_PREFILL_GROUP` full chunks, which a group of long prompts already
    takes. A burst of short prompts then costs one prefill step instead of one per eight, and no
    group ever asks more memory of a forward pass than eight long prompts do."""
    budget = _PREFILL_GROUP * chunk
    width = 0
    n = 0
    for tokens in waiting:
        width = max(width, min(tokens, chunk))
        if n >= _PREFILL_GROUP and (n + 1) * width > budget:
            break
        n += 1
    return max(1, min(max(n, _PREFILL_GROUP), max_batch))


def follow_hold_s(arrivals: Sequence[float], latest_ending: float, now: float) -> float:
    """How much longer prompts that arrived at `arrivals` wait for the rest of their round, from
    `now`, while followers of endings are due (the latest ended at `latest_ending`): until neither
    an arrival nor an ending came for _FOLLOW_GAP_S, and _FOLLOW_MAX_S after the first arrival at
    most. An ending counts because its follower cannot come before it: a prompt that came while
    the step that ended most of its round was running waits for their followers too."""
    last = max(max(arrivals), latest_ending)
    return max(0.0, min(min(arrivals) + _FOLLOW_MAX_S, last + _FOLLOW_GAP_S) - now)


def _portable(exc: Exception) -> Exception:
    """`exc` if it survives pickling, else a RuntimeError with its text."""
    try:
        pickle.loads(pickle.dumps(exc))
    except Exception:
        return RuntimeError(f"{type(exc).__name__}: {exc}")
    return exc


def main(argv: list[str]) -> None:
    run_as_worker()  # the daemon's policy is the daemon's (lmx.runtime.scheduling)
    fd, level = int(argv[0]), argv[1]
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the daemon, which stops us
    configure(level)
    conn = Connection(fd)
    try:
        config: LoadConfig = receive(conn)
    except EOFError:  # a spare the daemon never needed
        return
    structlog.contextvars.bind_contextvars(worker=config.model_id)
    Worker(config, conn).run()
    conn.close()


if __name__ == "__main__":
    main(sys.argv[1:])
