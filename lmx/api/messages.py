"""/v1/messages: Anthropic's Messages API, over the chat completions path, as LM Studio serves it
for Claude Code and the Anthropic SDKs.

A request becomes a chat completion request and runs as one: `system` the system message, each
message's blocks the chat messages (text, `thinking` as the reasoning, `tool_use` as calls,
`tool_result` as tool messages), `tools` and `tool_choice` the function tools and the choice,
`output_config.format` the response format, its `effort` the reasoning effort, `thinking:
disabled` a template told not to think. Its answer comes as a message of content
blocks (thinking, text, tool_use), streamed with Anthropic's events. Errors on these routes come in
Anthropic's envelope (lmx.api.errors).
"""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from typing import Any

from starlette.requests import Request

from lmx.api import translated
from lmx.api.generation import (
    Added,
    CallBegun,
    CallEnded,
    CallText,
    ChoiceState,
    new_id,
    whole_call,
)
from lmx.api.schemas import ChatCompletionRequest, CountTokensRequest, MessagesRequest
from lmx.errors import RequestError
from lmx.runtime.parsers import Content, Reasoning

_STOP_REASONS = {"length": "max_tokens", "stop": "end_turn"}
# A chat request's field as the Messages field it came from, for a 400 that names the latter. Its
# messages are not the request's one for one (the system prompt leads, tool results are messages).
_PARAMS = (
    (re.compile(r"^messages\b.*"), "messages"),
    (re.compile(r"^response_format(\.json_schema)?"), "output_config.format"),
    (re.compile(r"^tool_choice\.function.*"), "tool_choice"),
    (re.compile(r"^(tools\[\d+\])\.function\.parameters"), r"\1.input_schema"),
    (re.compile(r"^(tools\[\d+\])\.function"), r"\1"),
    (re.compile(r"^reasoning_effort$"), "output_config.effort"),
    (re.compile(r"^stop$"), "stop_sequences"),
    (re.compile(r"^thinking_token_budget$"), "thinking.budget_tokens"),
)
_EFFORTS = {"low": "low", "medium": "medium", "high": "high", "xhigh": "xhigh", "max": "xhigh"}


def chat_request(body: CountTokensRequest) -> ChatCompletionRequest:
    """The chat completion request that answers `body` (for a count of tokens, its prompt's).
    Raises RequestError naming the field."""
    messages = [{"role": "system", "content": _system(body.system)}] if body.system else []
    for i, message in enumerate(body.messages):
        messages += _messages(message, f"messages[{i}]")
    chat: dict[str, Any] = {"model": body.model, "messages": messages}
    # A last message of the assistant's is the answer's start (a prefill): it goes on from there.
    chat["continue_final_message"] = bool(messages) and messages[-1]["role"] == "assistant"
    if body.tools:
        chat["tools"] = [_tool(t, f"tools[{j}]") for j, t in enumerate(body.tools)]
    if body.tool_choice is not None:
        chat |= _tool_choice(body.tool_choice)
    config = body.output_config or {}
    if (fmt := config.get("format")) is not None:
        chat["response_format"] = _format(fmt, "output_config.format")
    elif body.output_format is not None:
        chat["response_format"] = _format(body.output_format, "output_format")
    if (effort := config.get("effort")) is not None:
        if effort not in _EFFORTS:
            raise RequestError(
                f"output_config.effort is {effort!r}, not one of {', '.join(_EFFORTS)}",
                param="output_config.effort",
            )
        chat["reasoning_effort"] = _EFFORTS[effort]
    if body.thinking is not None:
        kind = body.thinking.get("type")
        if kind not in ("enabled", "adaptive", "disabled"):
            raise RequestError(
                f"thinking.type is {kind!r}, not enabled, adaptive or disabled",
                param="thinking.type",
            )
        if kind == "disabled":
            chat["reasoning_effort"] = "none"
        elif "budget_tokens" in body.thinking:
            chat["thinking_token_budget"] = body.thinking["budget_tokens"]
    if isinstance(body, MessagesRequest):
        chat |= {
            "max_tokens": body.max_tokens,
            "stop": body.stop_sequences,
            "temperature": body.temperature,
            "top_p": body.top_p,
            "top_k": body.top_k,
            "stream": body.stream,
            "user": (body.metadata or {}).get("user_id"),
        }
    return translated.chat_request(chat, _PARAMS)


def messages_error(exc: RequestError) -> RequestError:
    """`exc`, raised for the chat request a Messages request runs as, naming the Messages
    field."""
    return translated.renamed(exc, _PARAMS)


def _system(system: str | list[dict[str, Any]]) -> str:
    return system if isinstance(system, str) else _text(system, "system")


def _text(blocks: Any, where: str, *, unseen: bool = False) -> str:
    """The text of `blocks`, text blocks all, a blank line between them; with `unseen` (a tool's
    result), an image or a document is a note saying it is not shown."""
    if not isinstance(blocks, list):
        raise RequestError(f"{where} must be a string or a list of text blocks", param=where)
    texts = []
    for j, block in enumerate(blocks):
        kind = _kind(block, f"{where}[{j}]")
        if unseen and kind in ("image", "document"):
            texts.append(translated.unseen(kind))
            continue
        if kind != "text":
            raise RequestError(
                f"{where}[{j}] is of type {kind!r}: lmx takes text blocks here",
                param=f"{where}[{j}].type",
            )
        texts.append(_string(block, "text", f"{where}[{j}]"))
    return "\n\n".join(texts)


def _messages(message: dict[str, Any], at: str) -> list[dict[str, Any]]:
    """A message as chat messages: an assistant's as one (its text, reasoning and calls); a user's
    as a tool message per tool result (one that failed, `is_error`, saying so first), then one of
    its text, if it has any."""
    role = message.get("role")
    content = message.get("content")
    if role not in ("user", "assistant"):
        raise RequestError(f"{at}.role is {role!r}, not user or assistant", param=f"{at}.role")
    if isinstance(content, str):
        return [{"role": role, "content": content}]
    if not isinstance(content, list):
        raise RequestError(
            f"{at}.content must be a string or a list of content blocks", param=f"{at}.content"
        )
    texts: list[str] = []
    out: list[dict[str, Any]] = []
    thought: list[str] = []
    calls: list[dict[str, Any]] = []
    for j, block in enumerate(content):
        where = f"{at}.content[{j}]"
        match role, _kind(block, where):
            case _, "text":
                texts.append(_string(block, "text", where))
            case "assistant", "thinking":
                thought.append(_string(block, "thinking", where))
            case "assistant", "redacted_thinking":
                pass  # another server's, sealed: nothing lmx can read
            case "assistant", "tool_use":
                arguments = block.get("input", {})
                if not isinstance(arguments, dict):
                    raise RequestError(f"{where}.input must be an object", param=f"{where}.input")
                function = {"name": _string(block, "name", where), "arguments": arguments}
                calls.append(
                    {"id": _string(block, "id", where), "type": "function", "function": function}
                )
            case "user", "tool_result":
                result = block.get("content", "")
                text = (
                    result
                    if isinstance(result, str)
                    else _text(result, f"{where}.content", unseen=True)
                )
                failed = block.get("is_error", False)
                if not isinstance(failed, bool):
                    raise RequestError(
                        f"{where}.is_error must be a boolean", param=f"{where}.is_error"
                    )
                if failed:  # the templates have no place for it: the model reads it
                    text = f"Error: {text}" if text else "Error: the tool failed"
                tool_id = _string(block, "tool_use_id", where)
                out.append({"role": "tool", "tool_call_id": tool_id, "content": text})
            case _, kind:
                takes = (
                    "text, thinking and tool_use" if role == "assistant" else "text and tool_result"
                )
                raise RequestError(
                    f"{where} is of type {kind!r}: lmx takes {takes} blocks from the {role}",
                    param=f"{where}.type",
                )
    if role == "user":
        return out + ([{"role": "user", "content": "\n\n".join(texts)}] if texts else [])
    answer: dict[str, Any] = {"role": "assistant", "content": "\n\n".join(texts) or None}
    if thought:
        answer["reasoning_content"] = "\n\n".join(thought)
    if calls:
        answer["tool_calls"] = calls
    return [answer]


def _kind(block: Any, where: str) -> str:
    kind = block.get("type") if isinstance(block, dict) else None
    if not isinstance(kind, str):
        raise RequestError(f"{where} must be a content block with a type", param=f"{where}.type")
    return kind


def _string(block: dict[str, Any], key: str, where: str) -> str:
    value = block.get(key)
    if not isinstance(value, str):
        raise RequestError(f"{where} needs {key} as a string", param=f"{where}.{key}")
    return value


def _tool(tool: dict[str, Any], at: str) -> dict[str, Any]:
    """A client tool as a function tool. Anthropic's server tools (web search, code execution,
    its computer, bash and editor tools, whose `type` is versioned) run at Anthropic: a 400."""
    if tool.get("type", "custom") != "custom":
        raise RequestError(
            f"{at} is of type {tool.get('type')!r}: lmx runs client tools only (a name, a "
            "description and an input_schema)",
            param=f"{at}.type",
        )
    function = {"name": tool.get("name"), "parameters": tool.get("input_schema")}
    function |= {k: tool[k] for k in ("description", "strict") if k in tool}
    return {"type": "function", "function": function}


def _format(fmt: Any, at: str) -> dict[str, Any]:
    """A JSON output format as the chat request's (strict) `response_format`."""
    if not (isinstance(fmt, dict) and fmt.get("type") == "json_schema"):
        raise RequestError(f"{at} must be {{type: json_schema, schema}}", param=f"{at}.type")
    if not isinstance(fmt.get("schema"), dict):
        raise RequestError(f"{at}.schema must be a JSON schema object", param=f"{at}.schema")
    schema = {"name": "output", "schema": fmt["schema"], "strict": True}
    return {"type": "json_schema", "json_schema": schema}


def _tool_choice(choice: dict[str, Any]) -> dict[str, Any]:
    """The chat fields for `tool_choice`: auto, any (some tool), tool (that one), none; and
    `disable_parallel_tool_use`."""
    kind = choice.get("type")
    out: dict[str, Any] = {}
    match kind:
        case "auto" | "none":
            out["tool_choice"] = kind
        case "any":
            out["tool_choice"] = "required"
        case "tool" if isinstance(choice.get("name"), str):
            out["tool_choice"] = {"type": "function", "function": {"name": choice["name"]}}
        case _:
            raise RequestError(
                "tool_choice must be {type: auto}, {type: any}, {type: tool, name} or {type: none}",
                param="tool_choice",
            )
    if choice.get("disable_parallel_tool_use"):
        out["parallel_tool_calls"] = False
    return out


def asks(request: Request) -> bool:
    """Whether `request` comes from an Anthropic client: its SDKs send `anthropic-version`."""
    return "anthropic-version" in request.headers


def model_card(model: str, since_s: float) -> dict[str, Any]:
    """A served model in Anthropic's shape (its Models API)."""
    created = datetime.fromtimestamp(since_s, UTC).isoformat().replace("+00:00", "Z")
    return {
        "type": "model",
        "id": model,
        "display_name": model,
        "created_at": created,
        "lifecycle": "active",
    }


class Rendering:
    """One message's content blocks as they are generated: the stream's events, the answer."""

    def __init__(self, body: MessagesRequest) -> None:
        self.body = body
        self.id = new_id("msg").replace("-", "_")
        self.content: list[dict[str, Any]] = []  # the blocks, the open one last
        self._open: dict[str, Any] | None = None  # the thinking or text block being streamed

    def answer(self, state: ChoiceState) -> dict[str, Any]:
        """The whole message, once `state` has absorbed its last delta."""
        if state.error is not None:
            raise state.failure()
        parts: list[Added] = [Reasoning("".join(state.reasoning))] if state.reasoning else []
        if state.content:
            parts.append(Content("".join(state.content)))
        for i, call in enumerate(state.tool_calls):
            parts += whole_call(i, call)
        self.feed(parts)
        self._open = None
        return self._message(state, self._stop(state))

    def started(self, state: ChoiceState) -> bytes:
        return _event("message_start", message=self._message(state)) + _event("ping")

    def feed(self, added: list[Added]) -> bytes:
        """Add what `added` adds to the content; the stream's events for it."""
        out = b""
        for piece in added:
            match piece:
                case Reasoning(text) | Content(text) if text:
                    kind = "thinking" if isinstance(piece, Reasoning) else "text"
                    out += self._opened(kind)
                    assert self._open is not None
                    self._open[kind] += text
                    delta = {"type": f"{kind}_delta", kind: text}
                    out += _event("content_block_delta", index=len(self.content) - 1, delta=delta)
                case CallBegun(_, call_id, name):
                    out += self._closed()
                    block = {"type": "tool_use", "id": call_id, "name": name, "input": {}}
                    self.content.append(block)
                    out += _event(
                        "content_block_start", index=len(self.content) - 1, content_block=block
                    )
                case CallText(_, text):
                    delta = {"type": "input_json_delta", "partial_json": text}
                    out += _event("content_block_delta", index=len(self.content) - 1, delta=delta)
                case CallEnded(_, call):
                    self.content[-1]["input"] = _input(call.arguments)
                    out += _event("content_block_stop", index=len(self.content) - 1)
        return out

    def ended(self, state: ChoiceState) -> bytes:
        """The stream's last events: the open block's end, and the message's."""
        if state.error is not None:
            error = {"type": "api_error", "message": state.error}
            return self._closed() + _event("error", error=error)
        stop_reason, stop_sequence = self._stop(state)
        delta = {"stop_reason": stop_reason, "stop_sequence": stop_sequence}
        out = self._closed() + _event("message_delta", delta=delta, usage=_usage(state))
        return out + _event("message_stop")

    def _message(
        self, state: ChoiceState, stop: tuple[str | None, str | None] = (None, None)
    ) -> dict[str, Any]:
        return {
            "id": self.id,
            "type": "message",
            "role": "assistant",
            "model": self.body.model,
            "content": self.content,
            "stop_reason": stop[0],
            "stop_sequence": stop[1],
            "usage": _usage(state),
        }

    @staticmethod
    def _stop(state: ChoiceState) -> tuple[str, str | None]:
        """The stop reason and the stop sequence that ended the message, if one did."""
        if state.tool_calls and state.finish_reason in ("stop", "tool_calls"):
            return "tool_use", None
        if state.stop is not None:
            return "stop_sequence", state.stop
        return _STOP_REASONS.get(state.finish_reason or "stop", "end_turn"), None

    def _opened(self, kind: str) -> bytes:
        """Open a `kind` block (closing another first); its events."""
        if self._open is not None and self._open["type"] == kind:
            return b""
        out = self._closed()
        # A thinking block's signature: empty, lmx signs nothing (clients send it back as is).
        block = {"type": kind, kind: ""} | ({"signature": ""} if kind == "thinking" else {})
        self._open = block
        self.content.append(block)
        return out + _event("content_block_start", index=len(self.content) - 1, content_block=block)

    def _closed(self) -> bytes:
        block, self._open = self._open, None
        if block is None:
            return b""
        return _event("content_block_stop", index=self.content.index(block))


def _input(arguments: str) -> dict[str, Any]:
    """A call's arguments as its `input`, an object: none for arguments that do not parse (cut
    off by max_tokens)."""
    try:
        value = json.loads(arguments)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _usage(state: ChoiceState) -> dict[str, Any]:
    # Anthropic's input_tokens leave out the prompt's tokens read from the cache.
    return {
        "input_tokens": state.prompt_tokens - state.cached_tokens,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": state.cached_tokens,
        "output_tokens": state.completion_tokens,
        "output_tokens_details": {"thinking_tokens": state.reasoning_tokens},
    }


_event = translated.sse_event
