"""Rendering OpenAI wire objects: chat messages and chunks, text choices, logprobs, usage, SSE.

Pure functions over the API's accumulated choice state; the /v1 routes call them and never build
these shapes by hand.
"""

from __future__ import annotations

from typing import Any

import orjson

from lmx.api.generation import Added, CallBegun, CallText, ChoiceState
from lmx.runtime.engine import TokenLogprob
from lmx.runtime.parsers import Content, Reasoning, ToolCall


def lp_chat(lps: list[TokenLogprob]) -> dict[str, Any]:
    return {
        "content": [
            {
                "token": lp.token,
                "logprob": lp.logprob,
                "bytes": list(lp.bytes),
                "top_logprobs": [
                    {"token": t, "logprob": v, "bytes": list(b)} for t, v, b in lp.top
                ],
            }
            for lp in lps
        ]
    }


def tool_json(call: ToolCall) -> dict[str, Any]:
    return {
        "id": call.id,
        "type": "function",
        "function": {"name": call.name, "arguments": call.arguments},
    }


def usage(states: list[ChoiceState], prompts: int = 1) -> dict[str, Any]:
    # Each prompt counts once, however many choices share it.
    per_prompt = len(states) // max(prompts, 1)
    prompt = sum(s.prompt_tokens for s in states[::per_prompt]) if states else 0
    completion = sum(s.completion_tokens for s in states)
    cached = sum(s.cached_tokens for s in states[::per_prompt]) if states else 0
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
        "completion_tokens_details": {"reasoning_tokens": sum(s.reasoning_tokens for s in states)},
    }


def sse(obj: dict[str, Any] | str) -> bytes:
    data = obj.encode() if isinstance(obj, str) else orjson.dumps(obj)
    return b"data: " + data + b"\n\n"


DONE = sse("[DONE]")  # a stream's last event
# An SSE comment, which clients skip, for a stream that has sent nothing for KEEPALIVE_S: a
# proxy's read timeout (nginx's: 60 s) would end it.
KEEPALIVE, KEEPALIVE_S = b": keep-alive\n\n", 15.0


def error_event(message: str) -> bytes:
    return sse({"error": {"message": message, "type": "server_error", "param": None, "code": None}})


# A chat answer's reasoning goes out under both the names clients read: `reasoning_content`
# (DeepSeek's, llama.cpp's, LM Studio's for most models) and `reasoning` (OpenAI's guide to
# gpt-oss, LM Studio's for gpt-oss, vLLM's for all models since 0.17).


def chat_body(base: dict[str, Any], states: list[ChoiceState]) -> dict[str, Any]:
    choices = []
    for s in states:
        if s.error is not None:
            raise s.failure()
        message: dict[str, Any] = {"role": "assistant", "content": "".join(s.content) or None}
        if s.reasoning:
            message["reasoning_content"] = message["reasoning"] = "".join(s.reasoning)
        if s.tool_calls:
            message["tool_calls"] = [tool_json(c) for c in s.tool_calls]
        elif message["content"] is None:
            message["content"] = ""
        choices.append(
            {
                "index": s.index,
                "message": message,
                "logprobs": lp_chat(s.logprobs) if s.logprobs else None,
                "finish_reason": s.finish_reason,
            }
        )
    return {**base, "object": "chat.completion", "choices": choices, "usage": usage(states)}


def chat_delta(added: list[Added]) -> dict[str, Any]:
    """A chunk's delta of what `added` adds to a choice. A call streams as OpenAI streams one:
    its id and name with its first arguments, then the rest of its arguments by its index."""
    delta: dict[str, Any] = {}
    content = "".join(p.text for p in added if isinstance(p, Content))
    reasoning = "".join(p.text for p in added if isinstance(p, Reasoning))
    calls: list[dict[str, Any]] = []
    for p in added:
        match p:
            case CallBegun(index, call_id, name):
                function = {"name": name, "arguments": ""}
                calls.append(
                    {"index": index, "id": call_id, "type": "function", "function": function}
                )
            case CallText(index, text) if calls and calls[-1]["index"] == index:
                calls[-1]["function"]["arguments"] += text
            case CallText(index, text):
                calls.append({"index": index, "function": {"arguments": text}})
    if content:
        delta["content"] = content
    if reasoning:
        delta["reasoning_content"] = delta["reasoning"] = reasoning
    if calls:
        delta["tool_calls"] = calls
    return delta


def chat_opening(choice: dict[str, Any]) -> list[dict[str, Any]]:
    """The choices of the chunks that open a streamed choice, `choice` being its first delta.
    Text opens as OpenAI's does, the role and empty content first; a call, or reasoning, carries
    the role and null content in its own delta, as OpenAI streams a call (its message has none)."""
    delta = choice["delta"]
    if "content" not in delta and delta.keys() & {"tool_calls", "reasoning"}:
        return [{**choice, "delta": {"role": "assistant", "content": None, **delta}}]
    role = {"role": "assistant", "content": ""}
    return [
        {"index": choice["index"], "delta": role, "logprobs": None, "finish_reason": None},
        choice,
    ]


def lp_text(
    lps: list[TokenLogprob], offset0: int, echoed: tuple[str, list[TokenLogprob]] | None = None
) -> dict[str, Any]:
    """A text completion's logprobs. `echoed`: the echoed prompt's first token's text and its
    other tokens' logprobs, ahead of `lps` from offset 0 (the first token has none: null)."""
    entries: list[tuple[str, float | None, dict[str, float] | None]] = []
    if echoed is not None:
        first, prompt = echoed
        entries.append((first, None, None))
        lps, offset0 = [*prompt, *lps], 0
    entries += [(lp.token, lp.logprob, {t: v for t, v, _ in lp.top}) for lp in lps]
    offsets, pos = [], offset0
    for token, _, _ in entries:
        offsets.append(pos)
        pos += len(token)
    return {
        "tokens": [e[0] for e in entries],
        "token_logprobs": [e[1] for e in entries],
        "top_logprobs": [e[2] for e in entries],
        "text_offset": offsets,
    }


def text_choice(index: int, text: str, finish: str | None = None) -> dict[str, Any]:
    return {"index": index, "text": text, "logprobs": None, "finish_reason": finish}
