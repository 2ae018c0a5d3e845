"""OpenAI's deprecated functions API in chat completions, which older apps and frameworks still
send: `functions` and `function_call` in the request, a `function_call` in assistant messages and
`function` messages with its result. They are read as tools, tool calls and tool messages; the
answer's one call goes back as `function_call` (finish_reason `function_call`), streamed as
`function_call` deltas, as OpenAI answers them.
"""

from __future__ import annotations

from typing import Any

from lmx.errors import RequestError


def functions_as_tools(data: dict[str, Any]) -> dict[str, Any]:
    """A chat request's body with its functions as tools (`legacy_functions` set), its function
    choice as a tool choice, and its messages' function calls and results as tool calls and tool
    messages. Raises RequestError naming the field."""
    messages = data.get("messages")
    functions, choice = data.get("functions"), data.get("function_call")
    sent_back = isinstance(messages, list) and any(map(_is_legacy, messages))
    if not sent_back and functions is None and choice is None:
        return data  # the API of today: nothing to read (most requests, every time)
    out = dict(data)
    if sent_back:  # calls sent back, whether the functions come again or not
        out["messages"] = _messages(data["messages"])
    if functions is None:
        if choice is not None:
            raise RequestError("function_call needs functions", param="function_call")
        return out
    for newer, older in (("tools", "functions"), ("tool_choice", "function_call")):
        if data.get(newer) is not None and data.get(older) is not None:
            raise RequestError(f"give {newer} or {older}, not both", param=older)
    if not isinstance(functions, list):
        raise RequestError("functions must be a list of functions", param="functions")
    out["tools"] = [{"type": "function", "function": f} for f in functions]
    out["parallel_tool_calls"] = False  # the API's answer holds one call
    out["legacy_functions"] = True
    if isinstance(choice, dict):
        out["tool_choice"] = {"type": "function", "function": choice}
    elif choice is not None:
        out["tool_choice"] = choice  # "none" or "auto", as tool_choice takes them
    return out


def _is_legacy(message: Any) -> bool:
    """A function call or its result, as the deprecated API writes them."""
    if not isinstance(message, dict):
        return False
    return message.get("role") == "function" or bool(message.get("function_call"))


def _messages(messages: list[Any]) -> list[Any]:
    """Each assistant message's function call as a tool call, its id made up, and each function
    message as the tool message answering the call before it."""
    out: list[Any] = []
    call_id = None
    for i, m in enumerate(messages):
        if isinstance(m, dict) and m.get("role") == "assistant" and m.get("function_call"):
            m = dict(m)
            call_id = f"call_{i}"
            function = m.pop("function_call")
            m["tool_calls"] = [*(m.get("tool_calls") or ()), _call(call_id, function, i)]
        elif isinstance(m, dict) and m.get("role") == "function":
            m = {**m, "role": "tool", "tool_call_id": call_id or f"call_{i}"}
            call_id = None
        out.append(m)
    return out


def _call(call_id: str, function: Any, i: int) -> dict[str, Any]:
    if not isinstance(function, dict):
        at = f"messages[{i}].function_call"
        raise RequestError(f"{at} must be an object with name and arguments", param=at)
    return {"id": call_id, "type": "function", "function": function}


def with_function_call(choice: dict[str, Any], part: str) -> dict[str, Any]:
    """An answer's choice with the tool call in its `part` (message, or a stream's delta) as the
    function call, and finish_reason `function_call` for `tool_calls`."""
    held = dict(choice[part])
    for call in (held.pop("tool_calls", None) or ())[:1]:  # the request allowed one
        held["function_call"] = call["function"]
    reason = choice.get("finish_reason")
    return {
        **choice,
        part: held,
        "finish_reason": "function_call" if reason == "tool_calls" else reason,
    }
