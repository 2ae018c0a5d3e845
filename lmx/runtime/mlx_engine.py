"""The MLX engine: one model, one worker thread that owns every MLX call, continuous batching.

Built on mlx-lm's BatchGenerator. The asyncio side (`stream`) hands requests to the worker through
a queue and receives deltas through `loop.call_soon_threadsafe`; it never calls MLX itself.
New requests join the running batch at the next step; a cancelled stream leaves it at the next step.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import queue
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from typing import Any

import mlx.core as mx
import structlog
from mlx.utils import tree_flatten
from mlx_lm import load as mlx_load
from mlx_lm.generate import BatchGenerator, StopSequences
from mlx_lm.models.cache import LRUPromptCache, can_trim_prompt_cache, trim_prompt_cache

from lmx.errors import QueueFull, RequestError
from lmx.runtime.engine import (
    Delta,
    EngineState,
    EngineStats,
    GenerationRequest,
    LoadConfig,
    TokenLogprob,
)
from lmx.runtime.mlx_constraint import ConstrainedProcessor, ConstraintFactory
from lmx.runtime.mlx_sampling import make_processors, make_sampler
from lmx.runtime.mlx_tokenizer import MlxTokenizer
from lmx.runtime.textstream import ByteDecoder, IncrementalDecoder, StopMatcher

log = structlog.get_logger(__name__)

_IDLE_POLL_S = 0.5
_PROMPT_CACHE_ENTRIES = 64


def mlx_counters() -> tuple[int, int]:
    """MLX's (active, cache) bytes for the whole process."""
    return int(mx.get_active_memory()), int(mx.get_cache_memory())


def _params(model: Any) -> list[tuple[str, Any]]:
    flat: list[tuple[str, Any]] = tree_flatten(model.parameters())  # type: ignore[assignment]
    return flat


def device_name() -> str:
    return str(mx.default_device())


@dataclass(eq=False)
class _Seq:
    """One sequence as the worker sees it. Mutated only on the worker thread after submission."""

    request: GenerationRequest
    loop: asyncio.AbstractEventLoop
    out: asyncio.Queue[Delta]
    detok: ByteDecoder | IncrementalDecoder
    stops: StopMatcher
    uid: int = -1
    generated: int = 0
    cached_tokens: int = 0
    stop_ids: frozenset[int] = field(default_factory=frozenset)
    constraint: ConstrainedProcessor | None = None


def _joined(a: Delta, b: Delta) -> Delta:
    """`b` appended to `a`: the text, tokens and logprobs of both, and `b`'s ending."""
    return replace(
        b,
        text=a.text + b.text,
        token_ids=a.token_ids + b.token_ids,
        logprobs=a.logprobs + b.logprobs,
    )


class MlxEngine:
    """Implements `lmx.runtime.engine.Engine` on MLX."""

    def __init__(self, config: LoadConfig) -> None:
        self.config = config
        self._state = EngineState.UNLOADED
        self._inbox: queue.SimpleQueue[tuple[str, _Seq | None]] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._stopping = threading.Event()
        self._load_error: BaseException | None = None
        self._tokenizer: MlxTokenizer | None = None
        self._constraints: ConstraintFactory | None = None
        self._context_length = config.context_length or 4096
        self._weights_bytes = 0
        self._kv_bytes = 0
        self._prompt_cache_bytes = 0
        self._in_flight = 0
        self._active = 0
        self._steps = 0
        self._generated = 0

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

    def load(self) -> None:
        self._state = EngineState.LOADING
        self._thread = threading.Thread(
            target=self._run, name=f"mlx-{self.config.model_id}", daemon=True
        )
        self._thread.start()
        self._ready.wait()
        if self._load_error is not None:
            self._state = EngineState.FAILED
            raise self._load_error
        self._state = EngineState.READY

    def unload(self) -> None:
        self._stopping.set()
        self._inbox.put(("stop", None))  # wake an idle worker now, not at its next poll
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self._state = EngineState.UNLOADED

    def resident_bytes(self) -> int:
        return self._weights_bytes + self._kv_bytes + self._prompt_cache_bytes

    def stats(self) -> EngineStats:
        return EngineStats(
            in_flight=self._in_flight,
            queued=max(0, self._in_flight - self._active),
            active=self._active,
            resident_bytes=self.resident_bytes(),
            prompt_cache_bytes=self._prompt_cache_bytes,
            steps=self._steps,
            generated_tokens=self._generated,
        )

    # -- the asyncio side --

    async def stream(self, request: GenerationRequest) -> AsyncIterator[Delta]:
        if self._state is not EngineState.READY:
            raise RequestError(f"model {self.config.model_id!r} is not ready")
        n_prompt = len(request.prompt_tokens)
        if n_prompt == 0:
            raise RequestError("the prompt is empty", param="prompt")
        if n_prompt + request.params.max_tokens > self._context_length:
            raise RequestError(
                f"This model's maximum context length is {self._context_length} tokens. "
                f"However, you requested {n_prompt + request.params.max_tokens} tokens "
                f"({n_prompt} in the prompt, {request.params.max_tokens} in the completion).",
                param="max_tokens",
                code="context_length_exceeded",
            )
        if self._in_flight >= self.config.max_batch + self.config.max_queue:
            raise QueueFull(f"model {self.config.model_id!r} has too many requests queued")
        tok = self.tokenizer
        seq = _Seq(
            request=request,
            loop=asyncio.get_running_loop(),
            out=asyncio.Queue(),
            detok=tok.detokenizer(request.prompt_tokens),
            stops=StopMatcher(request.params.stop),
        )
        self._in_flight += 1
        self._inbox.put(("add", seq))
        try:
            while True:
                delta = await seq.out.get()
                # A consumer that fell behind gets what piled up as one delta (per step, not token).
                while delta.finish_reason is None and not seq.out.empty():
                    delta = _joined(delta, seq.out.get_nowait())
                yield delta
                if delta.finish_reason is not None:
                    return
        finally:
            self._in_flight -= 1
            self._inbox.put(("cancel", seq))

    # -- the worker thread: every MLX call for this model happens below --

    def _run(self) -> None:
        try:
            loaded: Any = mlx_load(str(self.config.path))
            model, wrapper = loaded[0], loaded[1]
            model_config = json.loads((self.config.path / "config.json").read_text())
            self._constraints = ConstraintFactory(
                wrapper, int(model_config["vocab_size"]), wrapper.eos_token_ids
            )
            self._tokenizer = MlxTokenizer(wrapper, self.config, self._constraints.marker_ids)
            self._context_length = self._resolve_context_length(model_config)
            self._weights_bytes = sum(int(v.nbytes) for _, v in _params(model))
            gen: Any = BatchGenerator(
                model,
                stop_tokens=[[t] for t in sorted(self._tokenizer.eos_token_ids)],
                completion_batch_size=self.config.max_batch,
                prefill_batch_size=min(8, self.config.max_batch),
                prefill_step_size=self.config.prefill_step,
                stream=mx.new_stream(mx.default_device()),
            )
        except BaseException as exc:  # surfaced to load()'s caller
            self._load_error = exc
            self._ready.set()
            return
        self._warn_if_slow(model)
        cache = LRUPromptCache(
            max_size=_PROMPT_CACHE_ENTRIES, max_bytes=self.config.prompt_cache_bytes
        )
        live: dict[int, _Seq] = {}
        self._ready.set()
        try:
            while not self._stopping.is_set():
                self._take_commands(gen, cache, live, block=not live)
                if live:
                    try:
                        self._step(gen, cache, live)
                    except Exception as exc:  # the batch is unusable: fail its requests, go on
                        log.exception("batch_step_failed", model=self.config.model_id)
                        gen.remove(list(live))
                        failed = [(s, self._final(s, "error", str(exc))) for s in live.values()]
                        live.clear()
                        self._deliver(failed)
        finally:
            for seq in live.values():
                self._deliver([(seq, self._final(seq, "error", "the model was unloaded"))])
            gen.close()
            del gen, model, cache
            self._kv_bytes = self._prompt_cache_bytes = 0
            gc.collect()
            mx.clear_cache()

    def _resolve_context_length(self, cfg: dict[str, Any]) -> int:
        native = int(cfg.get("max_position_embeddings") or cfg.get("max_seq_len") or 4096)
        return min(native, self.config.context_length or native)

    def _warn_if_slow(self, model: Any) -> None:
        dtypes = {str(v.dtype) for _, v in _params(model)}
        if mx.default_device() == mx.cpu and dtypes - {"mlx.core.float32"}:
            log.warning(
                "cpu_backend_slow",
                model=self.config.model_id,
                dtypes=sorted(dtypes),
                hint="MLX on the CPU runs bf16 and quantized weights slowly; expect a few tok/s",
            )

    def _take_commands(self, gen: Any, cache: Any, live: dict[int, _Seq], *, block: bool) -> None:
        try:
            cmd, seq = self._inbox.get(timeout=_IDLE_POLL_S) if block else self._inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            if seq is None:  # "stop": the loop checks _stopping next
                pass
            elif cmd == "add":
                try:
                    self._insert(gen, cache, live, seq)
                except Exception as exc:  # this request only: an error chunk, the batch goes on
                    log.warning("request_rejected", model=self.config.model_id, error=str(exc))
                    self._deliver([(seq, self._final(seq, "error", str(exc)))])
            elif seq.uid in live:
                gen.remove([seq.uid])
                del live[seq.uid]
            try:
                cmd, seq = self._inbox.get_nowait()
            except queue.Empty:
                break
        self._active = len(live)

    def _insert(self, gen: Any, cache: Any, live: dict[int, _Seq], seq: _Seq) -> None:
        req = seq.request
        p = req.params
        eos = self.tokenizer.eos_token_ids
        # A finished grammar allows only EOS, so a constrained request always stops on it.
        ignore_eos = p.ignore_eos and req.constraint is None
        seq.stop_ids = frozenset(p.stop_token_ids) | (frozenset() if ignore_eos else eos)
        tokens = list(req.prompt_tokens)
        kv, rest = (None, tokens)
        if self.config.prompt_cache_bytes > 0:
            kv, rest = cache.fetch_nearest_cache(self.config.model_id, tokens)
            if kv is not None and not rest:
                # An exact hit still needs one token to feed: step the cache back by one.
                if can_trim_prompt_cache(kv):
                    trim_prompt_cache(kv, 1)
                    rest = tokens[-1:]
                else:
                    kv, rest = None, tokens
        procs = make_processors(p, sorted(eos))
        if req.constraint is not None and self._constraints is not None:
            seq.constraint = self._constraints.make_processor(
                req.constraint.grammar, on_error="end"
            )
            procs.append(seq.constraint)
        seq.cached_tokens = len(tokens) - len(rest)
        (seq.uid,) = gen.insert(
            [rest],
            max_tokens=[p.max_tokens],
            caches=[kv] if kv is not None else None,
            all_tokens=[tokens[: seq.cached_tokens]],
            samplers=[make_sampler(p)],  # None entries fall back to the batch's greedy sampler
            logits_processors=[procs],
            stop_sequences=[StopSequences([[t] for t in sorted(seq.stop_ids)])],
        )
        live[seq.uid] = seq

    def _step(self, gen: Any, cache: Any, live: dict[int, _Seq]) -> None:
        _, responses = gen.next()
        self._steps += 1
        out: list[tuple[_Seq, Delta]] = []
        for r in responses:
            seq = live.get(r.uid)
            if seq is None:
                continue
            seq.generated += 1
            self._generated += 1
            finish = r.finish_reason
            hit_stop_token = finish == "stop" and r.token in seq.stop_ids
            text = "" if hit_stop_token else seq.detok.add(r.token)
            if finish is not None:
                text += seq.detok.flush()
            text, stopped = seq.stops.feed(text)
            if stopped:
                finish = "stop"
                kv = gen.remove([r.uid], return_prompt_caches=True).get(r.uid)
                if kv is not None and self.config.prompt_cache_bytes > 0:
                    cache.insert_cache(self.config.model_id, list(kv[1]), kv[0])
            elif finish is not None:
                text += seq.stops.flush()
                if r.prompt_cache is not None and self.config.prompt_cache_bytes > 0:
                    cache.insert_cache(
                        self.config.model_id, list(r.all_tokens or []), r.prompt_cache
                    )
            lps = self._logprobs(seq, r.token, r.logprobs) if seq.request.params.logprobs else ()
            if finish is not None:
                del live[r.uid]
                error = seq.constraint.error if seq.constraint is not None else None
                out.append((seq, self._final(seq, finish, error, text, r.token, lps)))
            elif text or lps:
                out.append((seq, Delta(text=text, token_ids=(r.token,), logprobs=lps)))
        self._active = len(live)
        self._kv_bytes = gen.prompt_cache_nbytes
        self._prompt_cache_bytes = cache.nbytes
        if out:
            self._deliver(out)

    def _logprobs(self, seq: _Seq, token: int, logprobs: mx.array) -> tuple[TokenLogprob, ...]:
        tok = self.tokenizer
        k = seq.request.params.top_logprobs
        top: tuple[tuple[str, float, tuple[int, ...]], ...] = ()
        if k > 0:
            idx = mx.argpartition(-logprobs, kth=k - 1)[:k]
            vals = logprobs[idx]
            ids: list[int] = idx.tolist()  # type: ignore[assignment]
            values: list[float] = vals.tolist()  # type: ignore[assignment]
            pairs = sorted(zip(ids, values, strict=True), key=lambda x: -x[1])
            top = tuple(
                (s, v, tuple(s.encode())) for s, v in ((tok.decode([i]), v) for i, v in pairs)
            )
        text = tok.decode([token])
        chosen: float = logprobs[token].item()  # type: ignore[assignment]
        return (TokenLogprob(text, chosen, tuple(text.encode()), top),)

    def _final(
        self,
        seq: _Seq,
        finish: str,
        error: str | None,
        text: str = "",
        token: int | None = None,
        lps: tuple[TokenLogprob, ...] = (),
    ) -> Delta:
        return Delta(
            text=text,
            token_ids=() if token is None else (token,),
            logprobs=lps,
            finish_reason=finish,
            prompt_tokens=len(seq.request.prompt_tokens),
            completion_tokens=seq.generated,
            cached_tokens=seq.cached_tokens,
            error=error,
        )

    @staticmethod
    def _deliver(items: list[tuple[_Seq, Delta]]) -> None:
        loop = items[0][0].loop

        def put() -> None:
            for seq, delta in items:
                seq.out.put_nowait(delta)

        with contextlib.suppress(RuntimeError):  # the loop closed: nobody is listening
            loop.call_soon_threadsafe(put)


def clear_cache() -> None:
    """Return MLX's buffer cache to the system (process-wide)."""
    mx.clear_cache()
