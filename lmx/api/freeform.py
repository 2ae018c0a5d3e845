"""Custom tools (OpenAI's freeform tools, such as Codex's `apply_patch`): a tool whose input is
text, not JSON arguments. The model sees a function of one string, `input`, told the tool's
grammar if it has one (not enforced); its call's input is that string. Used by /v1/responses
(lmx.api.responses) and /v1/chat/completions alike.
"""

from __future__ import annotations

import json
import re
from typing import Any, TypeGuard

from lmx.errors import RequestError
from lmx.runtime.toolcalls import loads_or_none

# A custom tool's input is text, not JSON arguments: the model sees a function of one string,
# `input`, and its calls come back as custom_tool_call items holding that string.
FREEFORM: dict[str, Any] = {
    "type": "object",
    "properties": {"input": {"type": "string"}},
    "required": ["input"],
    "additionalProperties": False,
}


def freeform_description(tool: dict[str, Any], at: str) -> str:
    """A custom tool's description for the model, with where its input goes and, for a grammar
    format, the grammar (told to the model, not enforced)."""
    fmt = tool.get("format") or {"type": "text"}
    fmt = fmt if isinstance(fmt, dict) else {}
    described = str(tool.get("description") or "")
    if fmt.get("type") == "text":
        return f"{described}\n\nIts input is plain text, given as `input`.".lstrip()
    syntax, definition = fmt.get("syntax"), fmt.get("definition")
    if fmt.get("type") != "grammar" or syntax not in ("lark", "regex"):
        raise RequestError(
            f"{at}.format must be {{type: text}} or {{type: grammar, syntax: lark or regex,"
            " definition}",
            param=f"{at}.format",
        )
    if not isinstance(definition, str):
        raise RequestError(f"{at}.format needs definition as a string", param=f"{at}.format")
    told = f"Its input, given as `input`, is text in this {syntax} grammar:\n{definition}"
    return f"{described}\n\n{told}".lstrip()


def freeform_input(arguments: str) -> str:
    """A custom tool's input, from the arguments the model wrote for it: their `input`, their
    one string if the model named it otherwise, else the arguments' text as it is. Arguments cut
    off inside that string (max_output_tokens) give what came of it."""
    args = loads_or_none(arguments)
    for cut in range(6):  # cut off inside a string, perhaps within an escape (`\u00e`)
        if args is not None:
            break
        args = loads_or_none(arguments[: len(arguments) - cut] + '"}')
    if isinstance(args, dict):
        if isinstance(args.get("input"), str):
            return str(args["input"])
        texts = [v for v in args.values() if isinstance(v, str)]
        if len(args) == 1 and texts:
            return texts[0]
    return arguments


class InputReader:
    """A custom tool's input as the model writes its arguments, `{"input": "..."}`: the string's
    text, unescaped, a piece at a time. An escape cut between pieces waits for its end; arguments
    that open otherwise stream nothing (their input goes out whole at their end)."""

    _OPENING = re.compile(r'\s*\{\s*"input"\s*:\s*"')
    _COMPACT = '{"input":"'
    _PLAIN = re.compile(r'[^"\\]+')

    def __init__(self) -> None:
        self._raw = ""  # the arguments not yet read
        self._in: bool | None = None  # inside the string; None: its opening not yet read

    def feed(self, text: str) -> str:
        """The input's text that `text`, the arguments' next piece, completes."""
        self._raw += text
        if self._in is None:
            m = self._OPENING.match(self._raw)
            if m is None:
                compact = "".join(self._raw.split())
                if len(compact) >= len(self._COMPACT) or not self._COMPACT.startswith(compact):
                    self._in = False
                return ""
            self._in, self._raw = True, self._raw[m.end() :]
        if not self._in:
            return ""
        try:
            text, self._raw = self._unescaped(self._raw)
        except ValueError:  # an escape JSON has not: the whole input at the end says what came
            self._in = False
            return ""
        return text

    def _unescaped(self, raw: str) -> tuple[str, str]:
        """The text of `raw`, the string's next characters, up to its closing quote or to an
        escape whose end has not come; and what is left of `raw` after it."""
        out, i = [], 0
        while i < len(raw) and raw[i] != '"':
            if run := self._PLAIN.match(raw, i):
                out.append(run.group())
                i = run.end()
                continue
            width = 2  # \n, \", ...; \uXXXX, and two of them for a surrogate pair
            if raw[i + 1 : i + 2] == "u":
                width = 12 if raw[i + 2 : i + 4].upper() in ("D8", "D9", "DA", "DB") else 6
            if i + width > len(raw):
                break  # the escape's end comes with a later piece
            out.append(json.loads(f'"{raw[i : i + width]}"'))
            i += width
        if raw[i : i + 1] == '"':
            self._in = False
        return "".join(out), raw[i:]


# -- in chat completions: `{"type": "custom", "custom": {"name", "description", "format"}}` tools,
# their calls `{"id", "type": "custom", "custom": {"name", "input"}}`, streamed as deltas of that
# shape (`{"index", "custom": {"input": more}}` after the first), as OpenAI streams them.


def chat_as_functions(data: dict[str, Any]) -> dict[str, Any]:
    """A chat request's body with its custom tools as function tools, their names under
    `custom_tool_names`; a tool choice naming one, and the calls of its messages to them, as
    those of functions. Raises RequestError naming the field."""
    out = dict(data)
    messages = data.get("messages")
    if isinstance(messages, list):  # calls sent back, whether the tools come again or not
        out["messages"] = [_calls_as_functions(m, i) for i, m in enumerate(messages)]
    tools = data.get("tools")
    if not isinstance(tools, list) or not any(_is_custom(t) for t in tools):
        return out
    names, functions = [], []
    for j, tool in enumerate(tools):
        if not _is_custom(tool):
            functions.append(tool)
            continue
        custom = _named_custom(tool, f"tools[{j}]")
        names.append(custom["name"])
        description = freeform_description(custom, f"tools[{j}].custom")
        function = {"name": custom["name"], "description": description, "parameters": FREEFORM}
        functions.append({"type": "function", "function": function})
    out |= {"tools": functions, "custom_tool_names": names}
    choice = data.get("tool_choice")
    if _is_custom(choice):
        out["tool_choice"] = _as_function(choice, "tool_choice")
    elif isinstance(choice, dict) and isinstance(allowed := choice.get("allowed_tools"), dict):
        listed = allowed.get("tools")
        if isinstance(listed, list):
            at = "tool_choice.allowed_tools.tools"
            listed = [
                _as_function(t, f"{at}[{i}]") if _is_custom(t) else t for i, t in enumerate(listed)
            ]
            out["tool_choice"] = {**choice, "allowed_tools": {**allowed, "tools": listed}}
    return out


def _is_custom(item: Any) -> TypeGuard[dict[str, Any]]:
    return isinstance(item, dict) and item.get("type") == "custom"


def _named_custom(item: dict[str, Any], at: str) -> dict[str, Any]:
    custom = item.get("custom")
    if not isinstance(custom, dict) or not isinstance(custom.get("name"), str):
        raise RequestError(f"{at}.custom needs a name", param=f"{at}.custom.name")
    return custom


def _as_function(item: dict[str, Any], at: str) -> dict[str, Any]:
    return {"type": "function", "function": {"name": _named_custom(item, at)["name"]}}


def _calls_as_functions(message: Any, i: int) -> Any:
    calls = message.get("tool_calls") if isinstance(message, dict) else None
    if not isinstance(calls, list) or not any(_is_custom(c) for c in calls):
        return message
    out = []
    for k, call in enumerate(calls):
        if not _is_custom(call):
            out.append(call)
            continue
        custom = _named_custom(call, f"messages[{i}].tool_calls[{k}]")
        given = custom.get("input", "")
        if not isinstance(given, str):
            at = f"messages[{i}].tool_calls[{k}].custom.input"
            raise RequestError(f"{at} must be a string", param=at)
        arguments = json.dumps({"input": given}, ensure_ascii=False)
        function = {"name": custom["name"], "arguments": arguments}
        out.append({"id": call.get("id"), "type": "function", "function": function})
    return {**message, "tool_calls": out}


def custom_call(call: dict[str, Any]) -> dict[str, Any]:
    """A function call of a chat answer (`{"id", "type", "function"}`) as the custom tool's call."""
    function = call["function"]
    custom = {"name": function["name"], "input": freeform_input(function["arguments"])}
    return {"id": call["id"], "type": "custom", "custom": custom}


class CustomDeltas:
    """A streamed chat choice's tool call deltas, those of custom tools (`names`) made theirs:
    the first with the call's id and name, then its input as the model writes it."""

    def __init__(self, names: frozenset[str]) -> None:
        self._names = names
        self._calls: dict[int, tuple[InputReader, list[str]]] = {}  # by index: reader, sent

    def rewrite(self, calls: list[dict[str, Any]], ended: dict[int, str]) -> list[dict[str, Any]]:
        """`calls`, a delta's tool calls, for a client of custom tools; `ended`: the calls that
        end with this delta, by index, with their whole arguments."""
        out = []
        for call in calls:
            index, function = call["index"], call.get("function", {})
            if function.get("name") in self._names:
                self._calls[index] = (InputReader(), [])
                custom = {"name": function["name"], "input": ""}
                out.append({"index": index, "id": call["id"], "type": "custom", "custom": custom})
            elif index not in self._calls:
                out.append(call)
                continue
            reader, sent = self._calls[index]
            if read := reader.feed(function.get("arguments", "")):
                sent.append(read)
                out.append({"index": index, "custom": {"input": read}})
        for index, arguments in ended.items():
            if index in self._calls:
                _, sent = self._calls.pop(index)
                text, so_far = freeform_input(arguments), "".join(sent)
                if text.startswith(so_far) and len(text) > len(so_far):
                    out.append({"index": index, "custom": {"input": text[len(so_far) :]}})
        return _merged(out)


def _merged(calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Consecutive deltas of one call as one."""
    out: list[dict[str, Any]] = []
    for call in calls:
        last = out[-1] if out else None
        if (
            last is not None
            and last["index"] == call["index"]
            and "custom" in last
            and list(call) == ["index", "custom"]
        ):
            last["custom"] = {
                **last["custom"],
                "input": last["custom"]["input"] + call["custom"]["input"],
            }
        else:
            out.append(call)
    return out
