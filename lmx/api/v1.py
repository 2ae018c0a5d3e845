"""OpenAI-compatible routes: /v1/models, /v1/chat/completions, /v1/completions, /v1/responses,
/v1/embeddings; and Anthropic's /v1/messages (lmx.api.messages).

Streaming responses are SSE ending with `data: [DONE]` (Responses and Messages: with their own
last events). Errors that happen before the first byte become error envelopes (lmx.api.errors);
errors after it become a final `error` event.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from contextlib import AsyncExitStack
from dataclasses import replace
from math import inf
from typing import Annotated, Any, Literal

import structlog
from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel
from starlette.types import Receive, Scope, Send

from lmx import __version__
from lmx.api import messages as anthropic
from lmx.api import translated
from lmx.api.auth import require_inference
from lmx.api.chunks import (
    DONE,
    KEEPALIVE,
    KEEPALIVE_S,
    chat_body,
    chat_delta,
    chat_opening,
    error_event,
    lp_chat,
    lp_text,
    sse,
    text_choice,
    usage,
)
from lmx.api.constraints import constraint_for
from lmx.api.deps import AppDeps
from lmx.api.embedding import embeddings_body, token_rows
from lmx.api.freeform import CustomDeltas, custom_call
from lmx.api.generation import (
    CallEnded,
    ChoiceState,
    chat_prompt,
    completion_prompts,
    forbid_calls,
    generation_requests,
    merged,
    new_id,
    output_parsers,
    texts_or_ids,
    truncated_prompt,
    upto,
)
from lmx.api.legacy_functions import with_function_call
from lmx.api.metrics import Metrics
from lmx.api.responses import (
    Rendering,
    chat_request,
    conversation,
    keeper,
    responses_error,
)
from lmx.api.schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    CountTokensRequest,
    EmbeddingRequest,
    ErrorEnvelope,
    MessagesRequest,
    ModelCard,
    ModelList,
    ResponsesRequest,
)
from lmx.api.shortcut import Endpoint
from lmx.errors import ModelNotFound, RequestError
from lmx.runtime.engine import (
    Delta,
    DeltaStream,
    Engine,
    GenerationRequest,
    SamplingParams,
    TokenLogprob,
)
from lmx.runtime.parsers import Content, make_parser
from lmx.runtime.sampling import SamplingDefaults

FINGERPRINT = f"fp_lmx_{__version__}"

log = structlog.get_logger(__name__)


async def get_deps(request: Request) -> AppDeps:
    deps: AppDeps = request.app.state.deps
    return deps


Deps = Annotated[AppDeps, Depends(get_deps)]


async def inference_access(request: Request, deps: Deps) -> None:
    require_inference(deps.keys, request)


router = APIRouter(
    prefix="/v1",
    tags=["openai"],
    dependencies=[Depends(inference_access)],
    responses={code: {"model": ErrorEnvelope} for code in (400, 401, 404, 429, 503)},
)


@router.get("/models", response_model=ModelList)
@router.get("/models/", response_model=ModelList)  # not a model named "": the list
async def list_models(request: Request, deps: Deps) -> ModelList | JSONResponse:
    """The servable models; in Anthropic's shape for its clients (they send `anthropic-version`)."""
    served = deps.models.servable()
    if anthropic.asks(request):
        cards = [anthropic.model_card(m, deps.served_since_s) for m in served]
        first, last = (served[0], served[-1]) if served else (None, None)
        return JSONResponse({"data": cards, "has_more": False, "first_id": first, "last_id": last})
    created = int(deps.served_since_s)
    return ModelList(data=[ModelCard(id=m, created=created) for m in served])


@router.get("/models/{model:path}", response_model=ModelCard)
async def get_model(model: str, request: Request, deps: Deps) -> ModelCard | JSONResponse:
    if model not in deps.models.servable():
        raise ModelNotFound(model, deps.models.servable())
    if anthropic.asks(request):
        return JSONResponse(anthropic.model_card(model, deps.served_since_s))
    return ModelCard(id=model, created=int(deps.served_since_s))


class Generation:
    """One request's engine streams, held open (model acquired) until the response ends.

    Also where latency is measured: time to first token and the gaps between tokens, per choice;
    and where its end is logged (`generation_done`, debug level, with the request's id).
    """

    def __init__(
        self,
        stack: AsyncExitStack,
        stream: AsyncGenerator[tuple[int, Delta], None],
        model_id: str,
        sequences: int,
        metrics: Metrics,
        params: SamplingParams,
    ) -> None:
        self.stack = stack
        self.stream = stream
        self.model_id = model_id
        self.sequences = sequences
        self.params = params  # its first sequence's, defaults filled in
        self.ttft = metrics.ttft.labels(model_id)
        self.itl = metrics.itl.labels(model_id)
        self.queue = metrics.queue.labels(model_id)
        self.prefill = metrics.prefill.labels(model_id)
        self.prompt_tokens = metrics.prompt_tokens.labels(model_id)
        self.completion_tokens = metrics.completion_tokens.labels(model_id)
        self.started_s = time.perf_counter()
        self.last_token_s: dict[int, float] = {}
        self.ttft_s: float | None = None  # the first choice's
        self.finish_reasons: dict[int, str] = {}
        # Over the sequences that finished:
        self.prompt_total = self.completion_total = 0

    @classmethod
    async def start(
        cls,
        deps: AppDeps,
        model: str,
        places: int,
        build: Callable[[Engine, SamplingDefaults], list[GenerationRequest]],
        ttl_s: float | None = None,
    ) -> tuple[Generation, Engine, list[GenerationRequest]]:
        """`build`'s requests checked and queued, given the model and the sampling defaults of
        its spec and its files; `places`: how many sequences the request will have, held in the
        model's queue in arrival order while it is built; `ttl_s`: the idle TTL the request asks
        for its model (EngineRegistry.acquire)."""
        model_id = await deps.models.ensure_ready(model)
        deps.intake.concerns(model_id)  # not coming to other models' idle workers
        stack = AsyncExitStack()
        try:
            engine = await stack.enter_async_context(deps.registry.acquire(model_id, ttl_s))
            rid = new_id("req")  # its sequences are one request to the engine
            with engine.hold(rid, places):
                # On a thread: a 60k-token conversation's template and encoding held the event
                # loop, and every other stream, for 60 ms on the CPU.
                defaults = deps.models.sampling(model_id).over(engine.sampling_defaults)
                built = await asyncio.to_thread(build, engine, defaults)
                requests = [replace(r, request_id=rid) for r in built]
                streams: list[DeltaStream] = []
                for r in requests:
                    streams.append(engine.stream(r))
                    stack.push_async_callback(streams[-1].aclose)
                gen = cls(
                    stack, merged(streams), model_id, len(streams), deps.metrics, requests[0].params
                )
                stack.push_async_callback(gen.stream.aclose)
        except BaseException:
            await stack.aclose()
            raise
        return gen, engine, requests

    def _observe(self, i: int, d: Delta) -> None:
        now = time.perf_counter()
        if d.queue_s is not None:
            self.queue.observe(d.queue_s)
        if d.prefill_s is not None:
            self.prefill.observe(d.prefill_s)
        if d.token_ids:
            last = self.last_token_s.get(i)
            if last is None:
                self.ttft.observe(now - self.started_s)
                if self.ttft_s is None:
                    self.ttft_s = now - self.started_s
            else:
                # Coalesced deltas carry several tokens: spread the gap over them.
                gap = (now - last) / len(d.token_ids)
                for _ in d.token_ids:
                    self.itl.observe(gap)
            self.last_token_s[i] = now
        if d.finish_reason is not None:
            self.prompt_tokens.inc(d.prompt_tokens)
            self.completion_tokens.inc(d.completion_tokens)
            self.finish_reasons[i] = d.finish_reason
            self.prompt_total += d.prompt_tokens
            self.completion_total += d.completion_tokens

    async def close(self) -> None:
        """End its streams (cancelling those still going) and let go of the model; again,
        nothing."""
        await self.stack.aclose()

    async def deltas(self) -> AsyncIterator[tuple[int, Delta]]:
        try:
            async for i, d in self.stream:
                self._observe(i, d)
                yield i, d
        finally:
            await self.close()
            # At debug level (`lmx serve --log-level debug`): a line per request costs the event
            # loop about as much as the rest of a short request's own work in the daemon.
            log.debug(
                "generation_done",
                model=self.model_id,
                # A sequence that did not finish: its client left, or the stream ended early.
                finish_reasons=[
                    self.finish_reasons.get(i, "cancelled") for i in range(self.sequences)
                ],
                prompt_tokens=self.prompt_total,
                completion_tokens=self.completion_total,
                ttft_ms=None if self.ttft_s is None else round(self.ttft_s * 1e3, 1),
                duration_ms=round((time.perf_counter() - self.started_s) * 1e3, 1),
            )


class EventStream(StreamingResponse):
    """SSE whose events a stream ends with (its last chunk, usage, [DONE]) come as one item and go
    out with the end of the body: one write where each was one, and the body's end another. When
    32 streams end together, that is up to 96 fewer writes for the event loop that takes in their
    next requests meanwhile, and the clients read their ends at once (their CPU per request of a
    token: -12%, bench.http_overhead).

    Its headers go out at once, before the first token: a request waiting for a place in the
    batch, or for a long prompt's prefill, has an answer its client (or a proxy in front, whose
    read timeout is often 60 s) sees begin. Whenever no event has gone out for `keepalive_s`, an
    SSE comment does, which clients skip."""

    media_type = "text/event-stream"
    keepalive_s = KEEPALIVE_S

    def __init__(self, content: AsyncIterator[bytes], gen: Generation | None = None) -> None:
        """`gen`: the generation `content` renders, closed when the response ends even if its
        body never began (its first send failed: the client was gone)."""
        # Not cached, and not buffered by a proxy (nginx) in front: each event as it comes.
        super().__init__(content, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.gen = gen

    async def stream_response(self, send: Send) -> None:
        try:
            await self._stream(send)
        finally:
            if self.gen is not None:
                await self.gen.close()

    async def _stream(self, send: Send) -> None:
        """The body, and a comment where a whole `keepalive_s` passed without an event. The
        comment goes out from a task of its own, started by a timer that fires each interval
        (no task or lock per response or event while events flow); an event waits for a comment
        going out, and none starts while an event goes out or after the last."""
        await send(
            {"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers}
        )
        loop = asyncio.get_running_loop()
        sent = seen = 0  # events sent; as of the timer's last firing
        sending = ended = False
        comment: asyncio.Task[None] | None = None
        timer: asyncio.TimerHandle

        async def keep_alive() -> None:
            nonlocal comment
            try:
                await send({"type": "http.response.body", "body": KEEPALIVE, "more_body": True})
            finally:
                comment = None

        def tick() -> None:
            nonlocal seen, comment, timer
            if ended:
                return
            if sent == seen and not sending and comment is None:
                comment = loop.create_task(keep_alive())
            seen = sent
            timer = loop.call_later(self.keepalive_s, tick)

        timer = loop.call_later(self.keepalive_s, tick)
        try:
            async for item in self.body_iterator:
                chunk = item.encode(self.charset) if isinstance(item, str) else bytes(item)
                if comment is not None:
                    await comment
                ended, sending = chunk.endswith(DONE), True
                await send({"type": "http.response.body", "body": chunk, "more_body": not ended})
                sending, sent = False, sent + 1
            if not ended:
                if comment is not None:
                    await comment
                ended = True
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            timer.cancel()
            if comment is not None:
                comment.cancel()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Starlette's, without its anyio task group per response (its cancel scopes cost the
        event loop a seventh of its time per streamed request, bench.http_overhead): the body goes
        out from this task while another waits for the client to leave, and cancels it if so.
        A server of ASGI 2.4 tells of a client gone by failing a send: Starlette's way, as is."""
        spec = scope.get("asgi", {}).get("spec_version", "2.0")
        if tuple(map(int, spec.split("."))) >= (2, 4):
            await super().__call__(scope, receive, send)
            return
        responding = asyncio.current_task()
        assert responding is not None
        left = False

        async def watch() -> None:
            nonlocal left
            await self.listen_for_disconnect(receive)
            left = True
            responding.cancel()

        watcher = asyncio.create_task(watch())
        try:
            await self.stream_response(send)
        except asyncio.CancelledError:
            if not left or responding.uncancel() > 0:
                raise  # not (only) the client leaving
        finally:
            watcher.cancel()


async def start_chat(
    body: ChatCompletionRequest, deps: AppDeps, *, truncate: bool = False, fit: bool = False
) -> tuple[Generation, list[ChoiceState]]:
    """A chat request's generation under way, and a state per choice to absorb its deltas;
    `truncate`: its conversation's first turns left out as far as it takes to fit the context
    (see truncated_prompt); `fit`: its max_tokens cut to the room the prompt leaves in the
    context, where it asks for more (else a 400 names the limit)."""
    tools_on = bool(body.tools) and body.tool_choice != "none"
    max_tokens = body.max_completion_tokens or upto(body.max_tokens)
    if body.top_logprobs and not body.logprobs:
        raise RequestError("top_logprobs requires logprobs=true", param="top_logprobs")

    def build(engine: Engine, defaults: SamplingDefaults) -> list[GenerationRequest]:
        constraint = constraint_for(body, engine)
        prompt = chat_prompt(body, engine, thinking=constraint is None)
        most = engine.context_length - (max_tokens or 1)
        if truncate and len(prompt) > most:
            prompt = truncated_prompt(
                body, lambda b: chat_prompt(b, engine, thinking=constraint is None), most
            )
        room = engine.context_length - len(prompt)
        requests = generation_requests(
            body,
            engine,
            defaults,
            [prompt],
            max_tokens=min(max_tokens, room) if fit and max_tokens and room > 0 else max_tokens,
            logprobs=body.logprobs,
            top_logprobs=body.top_logprobs or 0,
            constraint=constraint,
        )
        forbidden = forbid_calls(body, engine)
        if forbidden is None:
            return requests
        return [
            replace(
                r, params=replace(r.params, logit_bias={**r.params.logit_bias, forbidden: -inf})
            )
            for r in requests
        ]

    gen, engine, requests = await Generation.start(deps, body.model, body.n, build, body.ttl)
    try:
        return gen, _choice_states(body, engine, requests, tools_on)
    except BaseException:  # its streams end, their places free, the model let go
        await gen.close()
        raise


def _choice_states(
    body: ChatCompletionRequest, engine: Engine, requests: list[GenerationRequest], tools: bool
) -> list[ChoiceState]:
    """A state per choice of `body`, to absorb its deltas into."""
    parsers = output_parsers(
        engine,
        requests[0].prompt_tokens,
        body.n,
        tools=tools,
        constrained=requests[0].constraint is not None,
        call_forced=body.forces_call,
        functions={t.function.name: t.function.parameters or {} for t in body.tools or ()},
    )
    return [
        ChoiceState(
            i,
            parser,
            prompt_tokens=len(requests[0].prompt_tokens),  # its usage before the end's
            one_call=body.parallel_tool_calls is False,
        )
        for i, parser in enumerate(parsers)
    ]


# What another API's route adds to an answer that is not streamed, from its generation and the
# states of its choices (lmx.api.lmstudio: LM Studio's stats).
More = Callable[["Generation", list[ChoiceState]], dict[str, Any]]


@router.post("/chat/completions", response_model=None)
async def chat_completions(body: ChatCompletionRequest, deps: Deps) -> Any:
    return await answer_chat(body, deps)


async def answer_chat(body: ChatCompletionRequest, deps: AppDeps, more: More | None = None) -> Any:
    """A chat completion, whole or as its stream; `more` adds to the whole answer."""
    gen, states = await start_chat(body, deps)
    rid, created = new_id("chatcmpl"), int(time.time())
    base = {"id": rid, "created": created, "model": body.model, "system_fingerprint": FINGERPRINT}
    if not body.stream:
        async for i, delta in gen.deltas():
            states[i].absorb(delta)
        answer = chat_body(base, states)
        for c in answer["choices"] if body.custom_tool_names else ():
            calls = c["message"].get("tool_calls") or ()
            c["message"]["tool_calls"] = [
                custom_call(t) if t["function"]["name"] in body.custom_tool_names else t
                for t in calls
            ] or None
        if body.legacy_functions:
            answer["choices"] = [with_function_call(c, "message") for c in answer["choices"]]
        return JSONResponse(answer | more(gen, states) if more else answer)
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    customs = (
        [CustomDeltas(body.custom_tool_names) for _ in states] if body.custom_tool_names else None
    )
    events = _chat_events(base, gen, states, include_usage, customs, body.legacy_functions)
    return EventStream(events, gen)


def _chat_events(
    base: dict[str, Any],
    gen: Generation,
    states: list[ChoiceState],
    include_usage: bool,
    customs: list[CustomDeltas] | None = None,
    legacy_functions: bool = False,
) -> AsyncIterator[bytes]:
    """The events of a streamed chat answer; `customs`: per choice, its custom tools' calls;
    `legacy_functions`: its call as a function call (lmx.api.legacy_functions)."""
    chunk = {**base, "object": "chat.completion.chunk"}
    if include_usage:
        chunk["usage"] = None
    # The choices whose role went out: with their first delta, or for several choices all at
    # once, in order. The openai SDK's stream helper takes each choice's first chunk for its
    # place in the list, and a call's text is held until its name is written, so choice 1 could
    # open first.
    opened: set[int] = set(range(len(states))) if len(states) > 1 else set()
    head = [
        {"index": i, "delta": {"role": "assistant"}, "logprobs": None, "finish_reason": None}
        for i in sorted(opened)
    ]

    def choice(i: int, d: Delta) -> list[dict[str, Any]]:
        state = states[i]
        lp_before = len(state.logprobs)
        added = state.absorb(d)
        if state.error is not None:
            return []  # the stream ends with it
        delta = chat_delta(added)
        if customs is not None:
            ended = {p.index: p.call.arguments for p in added if isinstance(p, CallEnded)}
            if calls := customs[i].rewrite(delta.pop("tool_calls", []), ended):
                delta["tool_calls"] = calls
        lps = state.logprobs[lp_before:]
        if not (delta or lps or state.finish_reason):
            return []
        lp = lp_chat(lps) if lps else None
        c = {"index": i, "delta": delta, "logprobs": lp, "finish_reason": state.finish_reason}
        if i in opened:
            out = [c]
        else:
            opened.add(i)
            out = chat_opening(c)
        return [with_function_call(o, "delta") for o in out] if legacy_functions else out

    return _events(
        gen, states, chunk, head, choice, (lambda: usage(states)) if include_usage else None
    )


async def _events(
    gen: Generation,
    states: list[ChoiceState],
    chunk: dict[str, Any],
    head: list[dict[str, Any]],
    choice: Callable[[int, Delta], list[dict[str, Any]]],
    usage_of: Callable[[], dict[str, Any]] | None,
) -> AsyncIterator[bytes]:
    """A stream's events: `chunk` with each of `head`'s choices, then with each of the choices
    `choice` makes of each delta (absorbing it into its state; none, one, or a choice's opening
    two), and at the end the usage (`usage_of`) and [DONE]. An error in a choice's output ends
    the stream with an error event."""
    for first in head:
        yield sse({**chunk, "choices": [first]})
    tail = b""  # the last choice's last events: they go with the stream's end
    async for i, d in gen.deltas():
        made = choice(i, d)
        error = states[i].error
        if error is not None:
            yield error_event(error)
            break
        if made:
            events = b"".join(sse({**chunk, "choices": [c]}) for c in made)
            if all(s.finish_reason for s in states):
                tail = events
            else:
                yield events
    else:
        if usage_of is not None:
            tail += sse({**chunk, "choices": [], "usage": usage_of()})
    yield tail + DONE


@router.post("/completions", response_model=None)
async def completions(body: CompletionRequest, deps: Deps) -> Any:
    return await answer_completion(body, deps)


async def answer_completion(
    body: CompletionRequest, deps: AppDeps, more: More | None = None
) -> Any:
    """A text completion, whole or as its stream; `more` adds to the whole answer."""
    if body.suffix:
        raise RequestError("suffix is not supported", param="suffix")
    if body.best_of is not None and body.best_of != body.n:
        raise RequestError(
            f"best_of {body.best_of} is not supported: each of the n choices is sampled once "
            "(leave best_of out, or equal to n)",
            param="best_of",
        )
    if body.max_tokens == 0 and not body.echo:
        raise RequestError("max_tokens 0 returns nothing without echo", param="max_tokens")
    want_lp = body.logprobs is not None
    scored = want_lp and body.echo  # the echoed prompt's tokens come with logprobs too

    prefixes: list[str] = []  # each sequence's echoed prompt, decoded as its prompt is built

    def build(engine: Engine, defaults: SamplingDefaults) -> list[GenerationRequest]:
        requests = generation_requests(
            body,
            engine,
            defaults,
            completion_prompts(body, engine),
            max_tokens=16 if body.max_tokens is None else upto(body.max_tokens),
            logprobs=want_lp,
            top_logprobs=body.logprobs or 0,
            prompt_logprobs=scored,
        )
        decode = engine.tokenizer.decode
        prefixes.extend(decode(r.prompt_tokens) if body.echo else "" for r in requests)
        return requests

    places = len(texts_or_ids(body.prompt)) * body.n
    # Nothing that can fail comes between its sequences queued and its answer, which ends them.
    gen, engine, requests = await Generation.start(deps, body.model, places, build, body.ttl)
    prompts = [r.prompt_tokens for r in requests]

    def logprobs(s: ChoiceState, lps: list[TokenLogprob], offset0: int) -> dict[str, Any]:
        """`lps` in the completions format, led by the echoed prompt's where it is scored."""
        if not scored:
            return lp_text(lps, offset0)
        first = engine.tokenizer.decode(list(prompts[s.index][:1]))
        return lp_text(lps, offset0, (first, s.prompt_logprobs))

    # A text completion is the raw continuation: no reasoning or tool-call splitting.
    states = [
        ChoiceState(i, make_parser(tool_parser=None, tools_enabled=False, reasoning=False))
        for i in range(len(prompts))
    ]
    n_prompts = len(prompts) // body.n
    base = {
        "id": new_id("cmpl"),
        "object": "text_completion",
        "created": int(time.time()),
        "model": body.model,
        "system_fingerprint": FINGERPRINT,
    }
    if not body.stream:
        async for i, delta in gen.deltas():
            states[i].absorb(delta)
        choices = []
        for s in states:
            if s.error is not None:
                raise s.failure()
            text = "".join(s.content)
            lps = logprobs(s, s.logprobs, len(prefixes[s.index])) if want_lp else None
            choices.append(
                {
                    "index": s.index,
                    "text": prefixes[s.index] + text,
                    "logprobs": lps,
                    "finish_reason": s.finish_reason,
                }
            )
        answer = {**base, "choices": choices, "usage": usage(states, n_prompts)}
        return JSONResponse(answer | more(gen, states) if more else answer)
    include_usage = bool(body.stream_options and body.stream_options.include_usage)

    if include_usage:
        base["usage"] = None
    # The echoed prompt leads each choice's events; where it is scored, it goes with the
    # choice's first delta, which brings its logprobs.
    head = (
        []
        if scored
        else [text_choice(s.index, prefixes[s.index]) for s in states if prefixes[s.index]]
    )
    echoed: set[int] = set()
    offsets = [0] * len(states)  # where in each choice's text its next token's begins

    def running(i: int, lps: dict[str, Any]) -> dict[str, Any]:
        """`lps`, choice `i`'s latest logprobs, its next token's offset moved past them."""
        if lps["tokens"]:
            offsets[i] = lps["text_offset"][-1] + len(lps["tokens"][-1])
        return lps

    def choice(i: int, d: Delta) -> list[dict[str, Any]]:
        s = states[i]
        lp_before = len(s.logprobs)
        text = "".join(p.text for p in s.absorb(d) if isinstance(p, Content))
        lps = s.logprobs[lp_before:]
        if scored and i not in echoed:
            echoed.add(i)
            c = text_choice(i, prefixes[i] + text, s.finish_reason)
            c["logprobs"] = running(i, logprobs(s, lps, 0))
            return [c]
        if not (text or lps or s.finish_reason):
            return []
        c = text_choice(i, text, s.finish_reason)
        c["logprobs"] = running(i, lp_text(lps, offsets[i])) if want_lp and lps else None
        return [c]

    usage_of = (lambda: usage(states, n_prompts)) if include_usage else None
    return EventStream(_events(gen, states, base, head, choice, usage_of), gen)


@router.post("/embeddings", response_model=None)
async def embeddings(body: EmbeddingRequest, deps: Deps) -> JSONResponse:
    model_id = await deps.models.ensure_ready(body.model)
    async with deps.registry.acquire(model_id, body.ttl) as engine:
        rid = new_id("req")
        with engine.hold(rid, 1):
            rows = await asyncio.to_thread(token_rows, body, engine.tokenizer)
            result = await engine.embed(rows, rid)
    answer = embeddings_body(body, result)
    deps.metrics.prompt_tokens.labels(model_id).inc(result.prompt_tokens)
    return JSONResponse(answer)


@router.post("/responses", response_model=None)
async def responses(body: ResponsesRequest, deps: Deps) -> Any:
    messages = conversation(deps.responses, body)
    chat = chat_request(body, messages)
    try:
        gen, states = await start_chat(chat, deps, truncate=body.truncation == "auto")
    except RequestError as exc:
        raise responses_error(exc) from None
    rendering = Rendering(body, keeper(deps.responses, body, messages), gen.params)
    return await rendered(gen, states[0], rendering, body.stream)


async def rendered(
    gen: Generation, state: ChoiceState, rendering: translated.Rendering, stream: bool
) -> Any:
    """The answer of another API served over the chat path, whole or as its stream."""
    if not stream:
        async for _, delta in gen.deltas():
            state.absorb(delta)
        return JSONResponse(rendering.answer(state))
    return EventStream(translated.stream_events(rendering, gen.deltas(), state), gen)


@router.post("/messages", response_model=None)
async def messages(body: MessagesRequest, deps: Deps) -> Any:
    """Anthropic's Messages API (lmx.api.messages)."""
    try:
        # Claude Code asks for 32,000 tokens or more whatever the model's context: cut to the
        # room left, its message ends at max_tokens there instead of failing.
        gen, states = await start_chat(anthropic.chat_request(body), deps, fit=True)
    except RequestError as exc:
        raise anthropic.messages_error(exc) from None
    return await rendered(gen, states[0], anthropic.Rendering(body), body.stream)


@router.post("/messages/count_tokens", response_model=None)
async def count_tokens(body: CountTokensRequest, deps: Deps) -> JSONResponse:
    """The tokens of the prompt a Messages request would have: its system prompt, messages and
    tools as the model's chat template writes them."""
    try:
        chat = anthropic.chat_request(body)
        model_id = await deps.models.ensure_ready(body.model)
        async with deps.registry.acquire(model_id) as engine:
            prompt = await asyncio.to_thread(chat_prompt, chat, engine, thinking=True)
    except RequestError as exc:
        raise anthropic.messages_error(exc) from None
    return JSONResponse({"input_tokens": len(prompt)})


@router.get("/responses/{response_id}", response_model=None)
async def get_response(response_id: str, deps: Deps) -> JSONResponse:
    return JSONResponse(deps.responses.get(response_id))


@router.get("/responses/{response_id}/input_items", response_model=None)
async def list_input_items(
    response_id: str,
    deps: Deps,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    order: Literal["asc", "desc"] = "desc",
    after: str | None = None,
) -> JSONResponse:
    return JSONResponse(
        deps.responses.input_items(response_id, limit=limit, order=order, after=after)
    )


@router.delete("/responses/{response_id}", response_model=None)
async def delete_response(response_id: str, deps: Deps) -> JSONResponse:
    deps.responses.delete(response_id)
    return JSONResponse({"id": response_id, "object": "response", "deleted": True})


# The generation routes, whose requests the intake counts while they are prepared (lmx.api.app),
# by path: body's model, endpoint.
GENERATION: dict[str, tuple[type[BaseModel], Endpoint]] = {
    "/v1/chat/completions": (ChatCompletionRequest, chat_completions),
    "/v1/completions": (CompletionRequest, completions),
    "/v1/responses": (ResponsesRequest, responses),
    "/v1/messages": (MessagesRequest, messages),
}
# The routes lmx.api.shortcut takes straight to their endpoints.
SHORTCUTS: dict[str, tuple[type[BaseModel], Endpoint]] = {
    **GENERATION,
    "/v1/embeddings": (EmbeddingRequest, embeddings),
}
