"""/v1/responses: OpenAI's Responses API, over the chat completions path.

A request becomes a chat completion request (`instructions`, the conversation of the response it
continues and its input items the conversation; function tools the tools, and custom and
local_shell tools functions of their input; `text.format` the response format) and runs as one.
Its answer, and each event of its stream, comes in the Responses shape: a reasoning item, a
message item and a call item per call (function_call, custom_tool_call, local_shell_call).

A response is kept (lmx.api.response_store) with its conversation, so that one continuing it
(`previous_response_id`) runs that conversation and its own input.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import time
from collections.abc import Callable, Sequence
from typing import Any

import orjson

from lmx.api import translated
from lmx.api.chunks import lp_chat
from lmx.api.freeform import FREEFORM, InputReader, freeform_description, freeform_input
from lmx.api.generation import Added, CallBegun, CallEnded, CallText, ChoiceState, whole_call
from lmx.api.response_store import Kept, ResponseStore, item_id, listed_items
from lmx.api.schemas import ChatCompletionRequest, ResponsesRequest
from lmx.errors import RequestError
from lmx.runtime.engine import SamplingParams
from lmx.runtime.parsers import Content, Reasoning
from lmx.runtime.toolcalls import loads_or_none

_ROLES = ("user", "system", "developer", "assistant")
# What `include` names to have the output text's logprobs (`top_logprobs` asks for them too).
_LOGPROBS = "message.output_text.logprobs"
# A reasoning item's `encrypted_content`, for clients that send back only that (Codex): its text,
# not encrypted (it is the client's own answer, on its own machine), after this mark.
_SEALED = "lmx-reasoning:"
_TEXT_PARTS = ("input_text", "output_text", "text", "refusal")
# The local_shell tool (Codex's for gpt-oss): the client runs a command the model gives as its
# argv. The model sees a function of that; its calls come back as local_shell_call items.
_LOCAL_SHELL = "local_shell"
_SHELL: dict[str, Any] = {
    "name": _LOCAL_SHELL,
    "description": "Run a command on the user's machine and get its output.",
    "parameters": {
        "type": "object",
        "properties": {
            "command": {
                "type": "array",
                "items": {"type": "string"},
                "description": "The program and its arguments.",
            },
            "working_directory": {"type": "string"},
            "timeout_ms": {"type": "integer"},
            "env": {"type": "object", "additionalProperties": {"type": "string"}},
        },
        "required": ["command"],
        "additionalProperties": False,
    },
}
_ACTION_KEYS = ("command", "working_directory", "timeout_ms", "env")
# A chat request's field as the Responses field it came from, for a 400 that names the latter.
# Messages come from the instructions, the conversation continued and the input: no index of
# theirs is the input's.
_PARAMS = (
    (re.compile(r"^messages\b.*"), "input"),
    (re.compile(r"^max_(completion_)?tokens$"), "max_output_tokens"),
    (re.compile(r"^response_format(\.json_schema)?"), "text.format"),
    (re.compile(r"^tool_choice\.function"), "tool_choice"),
    (re.compile(r"^tool_choice\.allowed_tools\.(tools\[\d+\])\.function"), r"tool_choice.\1"),
    (re.compile(r"^(tools\[\d+\])\.function"), r"\1"),
    (re.compile(r"^reasoning_effort$"), "reasoning.effort"),
)


def conversation(store: ResponseStore, body: ResponsesRequest) -> tuple[dict[str, Any], ...]:
    """The chat messages `body` answers, its instructions left out: the conversation of the
    response it continues, then its input. Raises RequestError naming the field."""
    return (*store.continued(body.previous_response_id), *_messages(body.input))


def keeper(
    store: ResponseStore, body: ResponsesRequest, conversation: tuple[dict[str, Any], ...]
) -> Callable[[dict[str, Any]], None] | None:
    """What keeps `body`'s response, answered to `conversation`, in `store` (None: `store` is
    false)."""
    if body.store is False:
        return None
    items = listed_items(body.input)
    own = len(orjson.dumps(items))

    def keep(response: dict[str, Any]) -> None:
        answer = _messages(response["output"], "output")
        nbytes = own + len(orjson.dumps(response))
        store.keep(
            Kept(response, (*conversation, *answer), items, nbytes), body.previous_response_id
        )

    return keep


def chat_request(
    body: ResponsesRequest, conversation: Sequence[dict[str, Any]]
) -> ChatCompletionRequest:
    """The chat completion request that answers `body`, whose `conversation` (see
    ResponseStore.conversation) the instructions lead. Raises RequestError naming the field."""
    messages = [{"role": "system", "content": body.instructions}] if body.instructions else []
    messages += conversation
    chat: dict[str, Any] = {"model": body.model, "messages": messages, "stream": body.stream}
    if body.tools:
        chat["tools"] = [_tool(t, j) for j, t in enumerate(body.tools)]
    if body.tool_choice is not None:
        chat["tool_choice"] = _tool_choice(body.tool_choice)
    fmt = (body.text or {}).get("format")
    if fmt is not None:
        if not isinstance(fmt, dict):
            raise RequestError("text.format must be an object with a type", param="text.format")
        chat["response_format"] = _format(fmt)
    if (effort := (body.reasoning or {}).get("effort")) is not None:
        chat["reasoning_effort"] = effort
    if _LOGPROBS in (body.include or ()) or body.top_logprobs:
        chat |= {"logprobs": True, "top_logprobs": body.top_logprobs or 0}
    chat |= {
        "max_completion_tokens": body.max_output_tokens,
        "temperature": body.temperature,
        "top_p": body.top_p,
        "parallel_tool_calls": body.parallel_tool_calls,
        "user": body.user,
    }
    return translated.chat_request(chat, _PARAMS)


def responses_error(exc: RequestError) -> RequestError:
    """`exc`, raised for the chat request a Responses request runs as, naming the Responses
    field."""
    return translated.renamed(exc, _PARAMS)


def _messages(given: str | list[dict[str, Any]], where: str = "input") -> list[dict[str, Any]]:
    """Input (or output) items as chat messages: a turn's function calls join its assistant
    message, each call's output is a tool message, and reasoning items are the reasoning of the
    assistant message that follows them (the template keeps it or drops it: Qwen3's and gpt-oss's
    keep it between the calls of the turn under way)."""
    if isinstance(given, str):
        return [{"role": "user", "content": given}]
    out: list[dict[str, Any]] = []
    thought = ""  # the text of the reasoning items since the last item of another type
    for i, item in enumerate(given):
        at = f"{where}[{i}]"
        kind = item.get("type", "message")
        if kind == "reasoning":
            thought += _thought(item, at)
            continue
        if kind == "message":
            role = item.get("role")
            if role not in _ROLES:
                raise RequestError(
                    f"{at}.role is {role!r}, not one of {', '.join(_ROLES)}", param=f"{at}.role"
                )
            out.append({"role": role, "content": _text(item.get("content"), f"{at}.content")})
        elif kind in ("function_call", "custom_tool_call", "local_shell_call"):
            if not out or out[-1]["role"] != "assistant":
                out.append({"role": "assistant", "content": None})
            out[-1].setdefault("tool_calls", []).append(_call(item, kind, at))
        elif kind in ("function_call_output", "custom_tool_call_output", "local_shell_call_output"):
            # A local shell call's output names the call by `id`.
            key = "id" if kind == "local_shell_call_output" and "call_id" not in item else "call_id"
            output = _text(item.get("output"), f"{at}.output", unseen=True)
            out.append({"role": "tool", "tool_call_id": _field(item, key, at), "content": output})
        else:
            raise RequestError(
                f"{at} is of type {kind!r}: lmx takes messages, reasoning items, and the calls"
                " of function, custom and local_shell tools and their outputs",
                param=f"{at}.type",
            )
        if thought and out[-1]["role"] == "assistant":
            out[-1]["reasoning_content"] = out[-1].get("reasoning_content", "") + thought
        thought = ""
    return out


def _call(item: dict[str, Any], kind: str, at: str) -> dict[str, Any]:
    """A call item as a chat tool call, with the arguments the model writes for it."""
    if kind == "function_call":
        name, arguments = _field(item, "name", at), _field(item, "arguments", at)
    elif kind == "custom_tool_call":
        name = _field(item, "name", at)
        arguments = json.dumps({"input": _field(item, "input", at)}, ensure_ascii=False)
    else:
        action = item.get("action")
        if not isinstance(action, dict) or not isinstance(action.get("command"), list):
            raise RequestError(f"{at}.action needs a command (a list)", param=f"{at}.action")
        name = _LOCAL_SHELL
        args = {k: action[k] for k in _ACTION_KEYS if action.get(k) is not None}
        arguments = json.dumps(args, ensure_ascii=False)
    key = "id" if kind == "local_shell_call" and "call_id" not in item else "call_id"
    return {
        "id": _field(item, key, at),
        "type": "function",
        "function": {"name": name, "arguments": arguments},
    }


def _thought(item: dict[str, Any], at: str) -> str:
    """A reasoning item's text: its content's, else its `encrypted_content` if lmx wrote it (see
    _SEALED; another server's is not lmx's to read), else its summary's."""
    texts = _texts(item, "content", at)
    sealed = item.get("encrypted_content")
    if not texts and isinstance(sealed, str) and sealed.startswith(_SEALED):
        try:
            return base64.b64decode(sealed[len(_SEALED) :], validate=True).decode()
        except (binascii.Error, UnicodeDecodeError):
            raise RequestError(
                f"{at}.encrypted_content is not one lmx wrote", param=f"{at}.encrypted_content"
            ) from None
    return "\n\n".join(texts or _texts(item, "summary", at))


def _texts(item: dict[str, Any], key: str, at: str) -> list[str]:
    parts = item.get(key) or []
    if not isinstance(parts, list):
        raise RequestError(f"{at}.{key} must be a list of text parts", param=f"{at}.{key}")
    return [p["text"] for p in parts if isinstance(p, dict) and isinstance(p.get("text"), str)]


def _field(item: dict[str, Any], key: str, at: str) -> str:
    value = item.get(key)
    if not isinstance(value, str):
        raise RequestError(f"{at} needs {key} as a string", param=f"{at}.{key}")
    return value


def _text(content: Any, where: str, *, unseen: bool = False) -> str:
    """A message's or an output's text: a string, or text parts joined; with `unseen` (a tool's
    output), an image or a file is a note saying it is not shown."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise RequestError(f"{where} must be a string or a list of text parts", param=where)
    texts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if unseen and kind in ("input_image", "input_file"):
            texts.append(translated.unseen(kind.removeprefix("input_")))
            continue
        if kind not in _TEXT_PARTS:
            raise RequestError(
                f"{where}[{j}] is of type {kind!r}: this model takes text only",
                param=f"{where}[{j}].type",
            )
        texts.append(str(part.get("refusal" if kind == "refusal" else "text", "")))
    return "".join(texts)


def _tool(tool: dict[str, Any], j: int) -> dict[str, Any]:
    """A function, custom or local_shell tool as the chat request's function tool."""
    match tool.get("type"):
        case "function":
            keys = ("name", "description", "parameters", "strict")
            return {"type": "function", "function": {k: tool[k] for k in keys if k in tool}}
        case "custom":
            function = {
                "name": tool.get("name"),
                "description": freeform_description(tool, f"tools[{j}]"),
                "parameters": FREEFORM,
            }
            return {"type": "function", "function": function}
        case "local_shell":
            return {"type": "function", "function": _SHELL}
    raise RequestError(
        f"tools[{j}] is of type {tool.get('type')!r}: lmx runs the tools a client runs"
        " (function, custom, local_shell), not hosted ones",
        param=f"tools[{j}].type",
    )


def _tool_choice(choice: str | dict[str, Any]) -> str | dict[str, Any]:
    if isinstance(choice, str):
        return choice
    if choice.get("type") == "allowed_tools" and isinstance(choice.get("tools"), list):
        tools = [_named(tool, f"tool_choice.tools[{i}]") for i, tool in enumerate(choice["tools"])]
        return {
            "type": "allowed_tools",
            "allowed_tools": {"mode": choice.get("mode"), "tools": tools},
        }
    return _named(choice, "tool_choice")


def _named(choice: Any, at: str) -> dict[str, Any]:
    """A function, custom or local shell tool named in a tool choice, as the chat's function."""
    kind = choice.get("type") if isinstance(choice, dict) else None
    if kind == _LOCAL_SHELL:
        return {"type": "function", "function": {"name": _LOCAL_SHELL}}
    if kind in ("function", "custom") and isinstance(choice.get("name"), str):
        return {"type": "function", "function": {"name": choice["name"]}}
    what = "{type: function or custom, name} or {type: local_shell}"
    if at == "tool_choice":
        what = f"none, auto, required, {what}, or {{type: allowed_tools, mode, tools}}"
    raise RequestError(f"{at} must be {what}", param=at)


def _format(fmt: dict[str, Any]) -> dict[str, Any]:
    match fmt.get("type"):
        case "text":
            return {"type": "text"}
        case "json_object":
            return {"type": "json_object"}
        case "json_schema":
            schema = {k: fmt[k] for k in ("name", "schema", "strict") if k in fmt}
            return {"type": "json_schema", "json_schema": schema}
    raise RequestError(
        f"text.format.type {fmt.get('type')!r} is not text, json_object or json_schema",
        param="text.format.type",
    )


class Rendering:
    """One response's output as it is generated: its items, the stream's events, the answer."""

    def __init__(
        self,
        body: ResponsesRequest,
        keep: Callable[[dict[str, Any]], None] | None = None,
        sampled: SamplingParams | None = None,
    ) -> None:
        self.body = body
        self._keep = keep  # given the response once it completes (see ResponseStore.keeper)
        # Its temperature and top_p as its generation used them (its model's defaults filled in).
        self._sampled = sampled or SamplingParams(
            temperature=1.0 if body.temperature is None else body.temperature,
            top_p=1.0 if body.top_p is None else body.top_p,
        )
        self.id = item_id("resp")
        self.created = int(time.time())
        self.output: list[dict[str, Any]] = []  # the items, the open one last
        self._open: dict[str, Any] | None = None  # the reasoning or message item being streamed
        self._seq = 0
        self._state: ChoiceState | None = None  # the choice it renders, once it has begun
        self._logprobs_seen = 0  # of the state's logprobs, those already in the output
        self._input = InputReader()  # the input of the custom tool call under way
        # The names of the calls that are not function calls, and their kind.
        self._kinds = {
            _LOCAL_SHELL if t.get("type") == _LOCAL_SHELL else t.get("name"): t.get("type")
            for t in body.tools or ()
            if t.get("type") in ("custom", _LOCAL_SHELL)
        }

    def response(
        self, status: str, state: ChoiceState | None = None, **more: Any
    ) -> dict[str, Any]:
        body = self.body
        return {
            "id": self.id,
            "object": "response",
            "created_at": self.created,
            "status": status,
            "error": None,
            "incomplete_details": None,
            "instructions": body.instructions,
            "max_output_tokens": body.max_output_tokens,
            "model": body.model,
            "output": self.output,
            "parallel_tool_calls": body.parallel_tool_calls is not False,
            "previous_response_id": body.previous_response_id,
            "reasoning": {"effort": (body.reasoning or {}).get("effort"), "summary": None},
            "store": self._keep is not None,
            "temperature": self._sampled.temperature,
            "text": body.text or {"format": {"type": "text"}},
            "tool_choice": body.tool_choice or "auto",
            "tools": body.tools or [],
            "top_logprobs": body.top_logprobs,
            "top_p": self._sampled.top_p,
            "truncation": body.truncation or "disabled",
            "usage": self._usage(state) if state is not None else None,
            "user": body.user,
            "metadata": body.metadata or {},
            **more,
        }

    def answer(self, state: ChoiceState) -> dict[str, Any]:
        """The whole response, once `state` has absorbed its last delta."""
        if state.error is not None:
            raise state.failure()
        self._state = state
        parts: list[Added] = [Reasoning("".join(state.reasoning))] if state.reasoning else []
        if state.content or not state.tool_calls:
            parts.append(Content("".join(state.content)))
        for i, call in enumerate(state.tool_calls):
            parts += whole_call(i, call)
        self.feed(parts)
        return self._final(state)

    def feed(self, added: list[Added]) -> bytes:
        """Add what `added` adds to the output; the stream's events for it. The logprobs of the
        tokens that added it go with its text, none with reasoning (as chat's go with each
        delta)."""
        out = b""
        lps = self._new_logprobs()
        for piece in added:
            match piece:
                case Reasoning(text) | Content(text):
                    kind = "reasoning" if isinstance(piece, Reasoning) else "message"
                    out += self._opened(kind)
                    assert self._open is not None
                    index = len(self.output) - 1
                    part = self._open["content"][0]
                    part["text"] += text
                    event = (
                        "response.reasoning_text.delta"
                        if kind == "reasoning"
                        else "response.output_text.delta"
                    )
                    more: dict[str, Any] = {}
                    if kind == "message":
                        more["logprobs"], lps = lps, []
                        part["logprobs"] += more["logprobs"]
                    out += self.event(
                        event,
                        item_id=self._open["id"],
                        output_index=index,
                        content_index=0,
                        delta=text,
                        **more,
                    )
                case CallBegun(_, call_id, name):
                    out += self._closed()
                    call = self._call_item(call_id, name)
                    self.output.append(call)
                    out += self.event(
                        "response.output_item.added", output_index=len(self.output) - 1, item=call
                    )
                case CallText(_, text) if self.output[-1]["type"] == "function_call":
                    call = self.output[-1]
                    call["arguments"] += text
                    ids = {"item_id": call["id"], "output_index": len(self.output) - 1}
                    out += self.event("response.function_call_arguments.delta", **ids, delta=text)
                case CallText(_, text) if self.output[-1]["type"] == "custom_tool_call":
                    call = self.output[-1]
                    if read := self._input.feed(text):
                        call["input"] += read
                        ids = {"item_id": call["id"], "output_index": len(self.output) - 1}
                        out += self.event(
                            "response.custom_tool_call_input.delta", **ids, delta=read
                        )
                case CallEnded(_, whole):
                    out += self._call_ended(whole.arguments)
        return out

    def _call_item(self, call_id: str, name: str) -> dict[str, Any]:
        """The item of a call begun, by the kind of its tool."""
        match self._kinds.get(name):
            case "custom":
                self._input = InputReader()
                return {
                    "type": "custom_tool_call",
                    "id": item_id("ctc"),
                    "call_id": call_id,
                    "name": name,
                    "input": "",
                }
            case "local_shell":
                action = {"type": "exec", "command": [], "env": {}}
                return {
                    "type": "local_shell_call",
                    "id": item_id("lsh"),
                    "call_id": call_id,
                    "action": action,
                    "status": "in_progress",
                }
        return {
            "type": "function_call",
            "id": item_id("fc"),
            "call_id": call_id,
            "name": name,
            "arguments": "",
            "status": "in_progress",
        }

    def _call_ended(self, arguments: str) -> bytes:
        """The events of the call item under way, ended with `arguments`: a custom tool's input
        (a string inside the arguments the model writes, streamed as it is written) whole, with
        what of it had not gone out yet, a local shell call's action, a function call's
        arguments."""
        call = self.output[-1]
        ids = {"item_id": call["id"], "output_index": len(self.output) - 1}
        out = b""
        if call["type"] == "custom_tool_call":
            sent, text = call["input"], freeform_input(arguments)
            call["input"] = text
            if text.startswith(sent) and len(text) > len(sent):
                delta = text[len(sent) :]
                out = self.event("response.custom_tool_call_input.delta", **ids, delta=delta)
            out += self.event("response.custom_tool_call_input.done", **ids, input=text)
        elif call["type"] == "local_shell_call":
            args = loads_or_none(arguments)
            args = args if isinstance(args, dict) else {}
            command = args.get("command")
            if isinstance(command, str):  # a command line, not its argv
                command = ["bash", "-lc", command]
            whole = isinstance(command, list) and all(isinstance(c, str) for c in command)
            if whole:
                call["action"] |= {k: args[k] for k in _ACTION_KEYS if k in args}
                call["action"]["command"] = command
            call["status"] = "completed" if whole else "incomplete"
        else:  # arguments that are no JSON: a call cut off by max_output_tokens, none to run
            whole = loads_or_none(arguments) is not None
            call |= {"arguments": arguments, "status": "completed" if whole else "incomplete"}
            out = self.event("response.function_call_arguments.done", **ids, arguments=arguments)
        return out + self.event(
            "response.output_item.done", output_index=ids["output_index"], item=call
        )

    def started(self, state: ChoiceState) -> bytes:
        self._state = state
        response = self.response("in_progress")
        return self.event("response.created", response=response) + self.event(
            "response.in_progress", response=response
        )

    def ended(self, state: ChoiceState) -> bytes:
        """The stream's last events: the open item's end, and the response's."""
        if state.error is not None:
            out = self._closed("incomplete")
            error = {"code": "server_error", "message": state.error}
            return out + self.event(
                "response.failed", response=self.response("failed", state, error=error)
            )
        # An answer of nothing is an empty message, as when it is not streamed.
        out = b"" if self.output else self._opened("message")
        out += self._closed("incomplete" if state.finish_reason == "length" else "completed")
        final = self._final(state)
        kind = "response.incomplete" if final["status"] == "incomplete" else "response.completed"
        return out + self.event(kind, response=final)

    def event(self, kind: str, **fields: Any) -> bytes:
        data = orjson.dumps({"type": kind, "sequence_number": self._seq, **fields})
        self._seq += 1
        return b"event: " + kind.encode() + b"\ndata: " + data + b"\n\n"

    def _final(self, state: ChoiceState) -> dict[str, Any]:
        self._closed("incomplete" if state.finish_reason == "length" else "completed")
        if state.finish_reason == "length":
            final = self.response(
                "incomplete", state, incomplete_details={"reason": "max_output_tokens"}
            )
        else:
            final = self.response("completed", state)
        if self._keep is not None:
            self._keep(final)
        return final

    def _opened(self, kind: str) -> bytes:
        """Open a `kind` item (closing another first); its events."""
        if self._open is not None and self._open["type"] == kind:
            return b""
        out = self._closed()
        part: dict[str, Any]
        if kind == "reasoning":
            part = {"type": "reasoning_text", "text": ""}
            item = {"type": "reasoning", "id": item_id("rs"), "summary": [], "content": [part]}
        else:
            part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
            item = {
                "type": "message",
                "id": item_id("msg"),
                "status": "in_progress",
                "role": "assistant",
                "content": [part],
            }
        self._open = item
        self.output.append(item)
        index = len(self.output) - 1
        empty = {**item, "content": []}
        out += self.event("response.output_item.added", output_index=index, item=empty)
        if kind == "message":
            out += self.event(
                "response.content_part.added",
                item_id=item["id"],
                output_index=index,
                content_index=0,
                part={**part, "text": ""},
            )
        return out

    def _closed(self, status: str = "completed") -> bytes:
        """Close the open item, if any; its events."""
        item, self._open = self._open, None
        if item is None:
            return b""
        index = self.output.index(item)
        part = item["content"][0]
        ids = {"item_id": item["id"], "output_index": index, "content_index": 0}
        if item["type"] == "reasoning":
            out = self.event("response.reasoning_text.done", **ids, text=part["text"])
            if "reasoning.encrypted_content" in (self.body.include or ()):
                item["encrypted_content"] = (
                    _SEALED + base64.b64encode(part["text"].encode()).decode()
                )
        else:
            item["status"] = status
            out = self.event(
                "response.output_text.done", **ids, text=part["text"], logprobs=part["logprobs"]
            )
            out += self.event("response.content_part.done", **ids, part=part)
        return out + self.event("response.output_item.done", output_index=index, item=item)

    def _new_logprobs(self) -> list[dict[str, Any]]:
        """The logprobs of the tokens since the last call, as OpenAI lists them."""
        state = self._state
        if state is None or len(state.logprobs) == self._logprobs_seen:
            return []
        new = state.logprobs[self._logprobs_seen :]
        self._logprobs_seen = len(state.logprobs)
        return list(lp_chat(new)["content"])

    def _usage(self, state: ChoiceState) -> dict[str, Any]:
        return {
            "input_tokens": state.prompt_tokens,
            "input_tokens_details": {"cached_tokens": state.cached_tokens},
            "output_tokens": state.completion_tokens,
            "output_tokens_details": {"reasoning_tokens": state.reasoning_tokens},
            "total_tokens": state.prompt_tokens + state.completion_tokens,
        }
