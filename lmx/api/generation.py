"""From an OpenAI request to engine requests, and from engine deltas back to OpenAI choices.

Used by the /v1 routes. Owns prompt building, parameter mapping, merging the `n` choices of one
request, and turning text into content / reasoning / tool calls. Never calls MLX.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
from collections.abc import AsyncGenerator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeAlias, TypeVar, cast

from lmx.api.schemas import (
    UNLIMITED,
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    SamplingFields,
)
from lmx.errors import GenerationFailed, LmxError, RequestError, TemporaryError
from lmx.runtime.engine import (
    Constraint,
    Delta,
    DeltaStream,
    Engine,
    GenerationRequest,
    SamplingParams,
    TokenLogprob,
    context_exceeded,
)
from lmx.runtime.parsers import (
    CALL_OPENERS,
    HARMONY,
    HARMONY_FINAL,
    CallArguments,
    CallOpened,
    Content,
    Functions,
    OutputParser,
    Piece,
    Reasoning,
    ToolCall,
    make_parser,
    opens_thinking,
)
from lmx.runtime.sampling import SamplingDefaults
from lmx.runtime.toolcalls import mistral_safe_id

_INSTRUCTING = ("system", "developer")  # messages that no truncation leaves out
_T = TypeVar("_T")


def new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


def upto(max_tokens: int | None) -> int | None:
    """A request's `max_tokens` as the most it takes; None: as many as the context leaves."""
    return None if max_tokens == UNLIMITED else max_tokens


def sampling_params(
    body: SamplingFields,
    engine: Engine,
    defaults: SamplingDefaults,
    n_prompt: int,
    *,
    max_tokens: int | None,
    choice: int,
    logprobs: bool = False,
    top_logprobs: int = 0,
    prompt_logprobs: bool = False,
) -> SamplingParams:
    """Map OpenAI fields to engine parameters, `defaults` for the sampling fields left out.
    Raises RequestError naming the field."""
    room = engine.context_length - n_prompt
    if room <= 0:
        raise RequestError(
            f"This model's maximum context length is {engine.context_length} tokens, "
            f"and the prompt has {n_prompt}.",
            param="messages" if isinstance(body, ChatCompletionRequest) else "prompt",
            code="context_length_exceeded",
        )
    if max_tokens is not None and max_tokens > room:
        chat = isinstance(body, ChatCompletionRequest) and body.max_completion_tokens is not None
        field = "max_completion_tokens" if chat else "max_tokens"
        raise context_exceeded(engine.context_length, n_prompt, max_tokens, field)
    bias: dict[int, float] = {}
    for key, value in (body.logit_bias or {}).items():
        if not key.lstrip("-").isdigit():
            raise RequestError(f"logit_bias key {key!r} is not a token id", param="logit_bias")
        bias[int(key)] = value
    stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
    if len(stop) > 16:
        raise RequestError("at most 16 stop sequences are allowed", param="stop")
    return SamplingParams(
        max_tokens=max_tokens if max_tokens is not None else room,
        temperature=_first(body.temperature, defaults.temperature, 1.0),
        top_p=_first(body.top_p, defaults.top_p, 1.0),
        top_k=max(0, _first(body.top_k, defaults.top_k, 0)),
        min_p=_first(body.min_p, defaults.min_p, 0.0),
        seed=None if body.seed is None else body.seed + choice,
        presence_penalty=body.presence_penalty or 0.0,
        frequency_penalty=body.frequency_penalty or 0.0,
        repetition_penalty=_first(body.repetition_penalty, defaults.repetition_penalty, 1.0),
        logit_bias=bias,
        stop=stop,
        min_tokens=body.min_tokens,
        ignore_eos=body.ignore_eos,
        logprobs=logprobs,
        top_logprobs=top_logprobs,
        prompt_logprobs=prompt_logprobs,
        thinking_budget=(
            body.thinking_token_budget if isinstance(body, ChatCompletionRequest) else None
        ),
    )


def _first(*values: _T | None) -> _T:
    """The first of `values` that is set (the last is)."""
    return next(v for v in values if v is not None)


def generation_requests(
    body: SamplingFields,
    engine: Engine,
    defaults: SamplingDefaults,
    prompts: Sequence[list[int]],
    *,
    max_tokens: int | None,
    logprobs: bool,
    top_logprobs: int,
    constraint: Constraint | None = None,
    prompt_logprobs: bool = False,
) -> list[GenerationRequest]:
    """A request's sequences: for each prompt, its `n` choices, each with its own seed. Refused
    (400) if they could never fit the model's batch and queue together: a 429 would be retried."""
    sequences = len(prompts) * body.n
    capacity = engine.config.max_batch + engine.config.max_queue
    if sequences > capacity:
        raise RequestError(
            f"the request asks for {sequences} sequences ({len(prompts)} prompts, n={body.n}); "
            f"this model takes at most {capacity} at once (its max_batch and max_queue)",
            param="prompt" if len(prompts) > 1 else "n",
        )
    return [
        GenerationRequest(
            prompt,
            sampling_params(
                body,
                engine,
                defaults,
                len(prompt),
                max_tokens=max_tokens,
                choice=i,
                logprobs=logprobs,
                top_logprobs=top_logprobs,
                prompt_logprobs=prompt_logprobs,
            ),
            constraint,
        )
        for prompt in prompts
        for i in range(body.n)
    ]


def _text_of(message: ChatMessage, index: int) -> str | None:
    if message.content is None or isinstance(message.content, str):
        return message.content
    parts = []
    for i, part in enumerate(message.content):
        if part.get("type") == "refusal" and message.role == "assistant":  # what it said, too
            parts.append(str(part.get("refusal", "")))
            continue
        if part.get("type") != "text":
            raise RequestError(
                f"content part of type {part.get('type')!r} is not supported by this model",
                param=f"messages[{index}].content[{i}].type",
            )
        parts.append(str(part.get("text", "")))
    return "".join(parts)


def chat_messages(
    body: ChatCompletionRequest, tool_parser: str | None = None
) -> list[dict[str, Any]]:
    """Messages as chat templates expect them: plain-text content, system for developer, the
    reasoning as `reasoning_content` (as Qwen3's and GLM's templates read it) and a tool call's
    arguments as an object (the wire's JSON string, given to a template that writes
    `arguments | tojson`, as Llama 3's and Qwen2.5's do, came out encoded twice). By the model's
    `tool_parser`: for Mistral's templates, call ids they take (9 letters and digits; another
    server's ids made them fail); for gpt-oss's, the reasoning also as `thinking`, which its
    template reads, except beside the content of a message with calls (the template refuses both:
    it writes either as the analysis before the calls; see also _one_call_each)."""
    mistral = tool_parser == "mistral"
    out = []
    for i, m in enumerate(body.messages):
        d = m.model_dump(exclude_none=True)
        d["content"] = _text_of(m, i)
        if m.role == "developer":
            d["role"] = "system"
        reasoning = d.pop("reasoning", None)
        reasoning = m.reasoning_content or reasoning
        if reasoning:
            d["reasoning_content"] = reasoning
            if tool_parser == HARMONY and not (m.tool_calls and d["content"]):
                d["thinking"] = reasoning
        if mistral and isinstance(d.get("tool_call_id"), str):
            d["tool_call_id"] = mistral_safe_id(d["tool_call_id"])
        for call in d.get("tool_calls") or ():
            if mistral:
                call["id"] = mistral_safe_id(call["id"])
            function = call["function"]
            if isinstance(function["arguments"], str):
                with contextlib.suppress(ValueError):
                    args = json.loads(function["arguments"])
                    if isinstance(args, dict):
                        function["arguments"] = args
        out.append(d)
    return _one_call_each(out) if tool_parser in _ONE_CALL_A_MESSAGE else out


# The formats whose templates write one call a message: gpt-oss's writes a message's first call
# only and names each tool result after the latest call before it; Llama 3's refuses a message
# of several ("This model only supports single tool-calls at once!").
_ONE_CALL_A_MESSAGE = frozenset({HARMONY, "llama3"})


def _one_call_each(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """For a template that writes one call a message: an assistant message with several calls
    becomes one per call (its reasoning and content with the first), each followed by its
    result, found by `tool_call_id` (by place where the ids do not match the calls), as such
    models call one function at a time. Results that answer no call stay after the last, in
    their order."""
    out: list[dict[str, Any]] = []
    i = 0
    while i < len(messages):
        m = messages[i]
        calls = m.get("tool_calls") or []
        i += 1
        if m["role"] != "assistant" or len(calls) < 2:
            out.append(m)
            continue
        results = []
        while i < len(messages) and messages[i]["role"] == "tool":
            results.append(messages[i])
            i += 1
        by_id = {r.get("tool_call_id"): r for r in results}
        ids = [c.get("id") for c in calls]
        unique = len(by_id) == len(results) and len(set(ids)) == len(ids)
        if unique and set(ids) >= by_id.keys():
            answers = [by_id.get(id_) for id_ in ids]
        else:
            answers = [*results[: len(calls)], *[None] * (len(calls) - len(results))]
        for k, (call, answer) in enumerate(zip(calls, answers, strict=True)):
            out.append(
                {**m, "tool_calls": [call]}
                if k == 0
                else {"role": "assistant", "content": "", "tool_calls": [call]}
            )
            if answer is not None:
                out.append(answer)
        out += [r for r in results if not any(r is a for a in answers)]
    return out


def call_opener(engine: Engine) -> int | None:
    """The token id that opens every tool call in the model's format, where it is one token."""
    opener = CALL_OPENERS.get(engine.tokenizer.tool_parser or "")
    return engine.tokenizer.marker_ids.get(opener) if opener is not None else None


def forbid_calls(body: ChatCompletionRequest, engine: Engine) -> int | None:
    """For `tool_choice: none`, as OpenAI means it (the model sees its tools and calls none):
    the call opener to forbid, where it is one token; else None, and the tools are left out of
    the prompt (the only way left to keep a model from calling them)."""
    return call_opener(engine) if body.tools and body.tool_choice == "none" else None


def chat_prompt(body: ChatCompletionRequest, engine: Engine, *, thinking: bool) -> list[int]:
    """The prompt's token ids. `thinking=False` asks the template not to open a <think> block
    (a grammar-constrained answer must start with the answer itself). With
    `continue_final_message` the prompt ends inside the last message, an assistant's. The tools
    are in it unless `tool_choice` is none and the model's calls cannot be forbidden
    (forbid_calls): a conversation whose turns switch between auto and none keeps one prefix for
    the prompt cache. Allowed tools the model may call or not (`auto`) are the only ones in it:
    a grammar holds it to those only where it must call one."""
    tools = None
    if body.tools and (body.tool_choice != "none" or forbid_calls(body, engine) is not None):
        shown = body.tools if body.forces_call else body.callable_tools
        tools = [t.model_dump(exclude_none=True) for t in shown]
    extra = dict(body.chat_template_kwargs or {})
    if body.reasoning_effort is not None:
        extra.setdefault("reasoning_effort", body.reasoning_effort)
    if not thinking or body.reasoning_effort == "none":
        extra.setdefault("enable_thinking", False)
    if body.continue_final_message:
        extra["continue_final_message"] = True
    opened = body.add_generation_prompt and not body.continue_final_message
    tok = engine.tokenizer
    try:
        messages = chat_messages(body, tok.tool_parser)
        prompt = tok.apply_chat_template(
            messages, tools=tools, add_generation_prompt=opened, extra=extra
        )
    except RequestError:
        raise
    except Exception as exc:  # the model's template rejected the conversation
        raise RequestError(f"the chat template failed: {exc}", param="messages") from None
    # Constrained, gpt-oss answers at once, with no reasoning: a call in the message the grammar
    # writes, anything else in the final channel.
    if opened and not thinking and tok.tool_parser == HARMONY and not body.forces_call:
        prompt += tok.encode(HARMONY_FINAL)[len(tok.encode("")) :]  # less any BOS
    return prompt


def truncated_prompt(
    body: ChatCompletionRequest, prompt_of: Callable[[ChatCompletionRequest], list[int]], most: int
) -> list[int]:
    """The prompt of `body` with its conversation's first turns left out, as few as leave at most
    `most` tokens (Responses' `truncation: auto`); its last turn's alone if none do. A turn starts
    at a user message; system and developer messages stay."""
    messages = body.messages
    firsts = [i for i, m in enumerate(messages) if m.role == "user"][1:]

    def prompt_from(start: int) -> list[int]:
        kept = [m for i, m in enumerate(messages) if i >= start or m.role in _INSTRUCTING]
        return prompt_of(body.model_copy(update={"messages": kept}))

    # The prompt shrinks as its start moves on: find the earliest start that fits.
    lo, hi, best = 0, len(firsts) - 1, None
    while lo <= hi:
        mid = (lo + hi) // 2
        prompt = prompt_from(firsts[mid])
        if len(prompt) <= most:
            best, hi = prompt, mid - 1
        else:
            lo = mid + 1
    if best is None:
        return prompt_from(firsts[-1]) if firsts else prompt_of(body)
    return best


def texts_or_ids(given: str | list[str] | list[int] | list[list[int]]) -> list[str | list[int]]:
    """OpenAI's four ways to give inputs (a text, texts, a text's token ids, several texts'), as
    one list of inputs, each a text or its token ids. By its first member: the request's schema
    took only lists of one kind, and a token-id input may be 100k long."""
    if isinstance(given, str):
        return [given]
    if given and isinstance(given[0], int):
        return [given]
    return cast(list[str | list[int]], given)


def completion_prompts(body: CompletionRequest, engine: Engine) -> list[list[int]]:
    prompts = texts_or_ids(body.prompt)
    if not prompts:
        raise RequestError("the prompt is empty", param="prompt")
    return [
        engine.tokenizer.encode(p) if isinstance(p, str) else [int(t) for t in p] for p in prompts
    ]


@dataclass(frozen=True)
class CallBegun:
    """The choice's call `index` begun: its arguments follow as CallText, and CallEnded ends it."""

    index: int
    id: str
    name: str


@dataclass(frozen=True)
class CallText:
    index: int
    text: str  # more of call `index`'s arguments


@dataclass(frozen=True)
class CallEnded:
    index: int
    call: ToolCall  # whole: its arguments are the CallTexts' joined


# What a delta adds to a choice's answer, in order: the parts its renderings stream.
Added: TypeAlias = Content | Reasoning | CallBegun | CallText | CallEnded


def whole_call(index: int, call: ToolCall) -> list[Added]:
    """A call as the parts a streamed one comes in."""
    begun = CallBegun(index, call.id, call.name)
    return [begun, CallText(index, call.arguments), CallEnded(index, call)]


@dataclass
class ChoiceState:
    """Accumulates one choice: parsed pieces, logprobs, finish reason, token counts."""

    index: int
    parser: OutputParser
    content: list[str] = field(default_factory=list)
    reasoning: list[str] = field(default_factory=list)
    tool_calls: list[ToolCall] = field(default_factory=list)
    logprobs: list[Any] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    stop: str | None = None  # the stop string that ended it, if one did
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    error: str | None = None
    retryable: bool = False  # its error: the model was unloaded under it (see failure)
    reasoning_tokens: int = 0  # see _count
    # `parallel_tool_calls: false`: a model's calls after its first are left out, as OpenAI
    # answers with one call at most (a grammar, where one applies, lets the model write no more)
    one_call: bool = False
    _open: CallOpened | None = field(default=None, init=False)  # the call streaming
    _sent: int = field(default=0, init=False)  # the characters of its arguments streamed
    _left_out: str = field(default="", init=False)  # a streaming call's id, left out (one_call)
    _uncounted: int = field(default=0, init=False)  # tokens whose text the parser still holds

    def failure(self) -> LmxError:
        """Its error, to raise for an answer not streamed: a 503 to retry where the model was
        unloaded under it (a drain's deadline, a stop: it is loaded again for the retry), else a
        500 saying how generation failed."""
        assert self.error is not None
        if self.retryable:
            return TemporaryError(self.error, delay_s=1.0)
        return GenerationFailed(self.error)

    def absorb(self, delta: Delta) -> list[Added]:
        """Take in `delta`; what it adds to the answer."""
        pieces = self.parser.feed(delta.text)
        if delta.finish_reason is not None:
            pieces += self.parser.finish()
            self.prompt_tokens = delta.prompt_tokens
            self.completion_tokens = delta.completion_tokens
            self.cached_tokens = delta.cached_tokens
            self.error, self.retryable = delta.error, delta.retryable
            self.stop = delta.stop
        self._count(len(delta.token_ids), pieces)
        added: list[Added] = []
        index = len(self.tool_calls)  # the open call's, or the next one's
        for piece in pieces:
            match piece:
                case Content(text):
                    self.content.append(text)
                    added.append(piece)
                case Reasoning(text):
                    self.reasoning.append(text)
                    added.append(piece)
                case CallOpened(call_id) if self.one_call and self.tool_calls:
                    self._left_out = call_id
                case CallOpened(call_id, name):
                    self._open, self._sent = piece, 0
                    added.append(CallBegun(index, call_id, name))
                case CallArguments(text) if self._open is not None:
                    self._sent += len(text)
                    added.append(CallText(index, text))
                case ToolCall(call_id) if self._open is not None and call_id == self._open.id:
                    # Its arguments are those streamed, or more: what it adds goes out too.
                    rest = piece.arguments[self._sent :]
                    added += [CallText(index, rest)] if rest else []
                    added.append(CallEnded(index, piece))
                    self.tool_calls.append(piece)
                    self._open, index = None, index + 1
                case ToolCall(call_id) if (self.one_call and self.tool_calls) or (
                    call_id == self._left_out
                ):
                    continue
                case ToolCall():
                    added += whole_call(index, piece)
                    self.tool_calls.append(piece)
                    index += 1
        self.logprobs.extend(delta.logprobs)
        self.prompt_logprobs.extend(delta.prompt_logprobs)
        if delta.finish_reason is not None:
            self.finish_reason = delta.finish_reason
            if self.tool_calls and delta.finish_reason == "stop":
                self.finish_reason = "tool_calls"
            self.reasoning_tokens = min(self.reasoning_tokens, self.completion_tokens)
        return added

    def _count(self, tokens: int, pieces: list[Piece]) -> None:
        """Count the reasoning's share of a delta's `tokens`, which made `pieces`: all of them
        where its text went to the reasoning alone, none where it went elsewhere, in proportion
        to the characters where it went to both. The tokens of text held back (a tag begun,
        markup dropped) count with the next text to come out: a tag that opens the reasoning
        with it, one that closes it with the answer after."""
        tokens += self._uncounted
        thought = said = 0
        for p in pieces:
            match p:
                case Reasoning(text):
                    thought += len(text)
                case Content(text) | CallArguments(text):
                    said += len(text)
                case ToolCall(arguments=arguments):
                    said += len(arguments)
        if not thought + said:
            self._uncounted = tokens
            return
        self._uncounted = 0
        self.reasoning_tokens += round(tokens * thought / (thought + said))


def output_parsers(
    engine: Engine,
    prompt: Sequence[int],
    n: int,
    *,
    tools: bool,
    constrained: bool = False,
    call_forced: bool = False,
    functions: Functions = None,
) -> list[OutputParser]:
    """The parsers of `n` chat answers to `prompt`, one each. A prompt that ends inside a <think>
    block (the template opened it, or an assistant's prefill did and left it open) starts the
    answer in reasoning, unless a grammar constrains it: the grammar's output (a tool call, JSON)
    is the answer from its first token, whatever the template opened. `call_forced`: that
    grammar's is a tool call, and the parsers read calls only (see make_parser's calls_only)."""
    tok = engine.tokenizer
    if tok.thinking is not None:
        inside = opens_thinking(prompt, tok.thinking)
    else:  # the tags are no tokens of their own: the prompt's last words tell
        inside = tok.decode(list(prompt[-4:])).rstrip().endswith("<think>")
    # A grammar makes a harmony model write its answer (JSON) in the final channel the prompt
    # opened (chat_prompt), plain; a call it writes in harmony.
    harmony_answer = constrained and not call_forced and tok.tool_parser == HARMONY
    return [
        make_parser(
            tool_parser=None if harmony_answer else tok.tool_parser,
            tools_enabled=tools,
            reasoning=tok.reasoning,
            starts_in_reasoning=tok.reasoning and inside and not constrained,
            functions=functions,
            calls_only=constrained and call_forced,
        )
        for _ in range(n)
    ]


async def merged(streams: list[DeltaStream]) -> AsyncGenerator[tuple[int, Delta], None]:
    """Interleave the deltas of several choices; closing this closes (cancels) all of them."""
    if len(streams) == 1:
        try:
            async for d in streams[0]:
                yield 0, d
        finally:
            await streams[0].aclose()
        return
    queue: asyncio.Queue[tuple[int, Delta | BaseException]] = asyncio.Queue()

    async def pump(i: int, s: DeltaStream) -> None:
        try:
            async for d in s:
                await queue.put((i, d))
        except Exception as exc:
            await queue.put((i, exc))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(streams)
        while remaining:
            i, item = await queue.get()
            if isinstance(item, BaseException):
                raise item
            yield i, item
            if item.finish_reason is not None:
                remaining -= 1
    finally:
        for t in tasks:
            t.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*tasks, return_exceptions=True)
        for s in streams:
            await s.aclose()
