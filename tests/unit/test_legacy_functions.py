"""OpenAI's deprecated functions API read as tools (lmx.api.legacy_functions)."""

from __future__ import annotations

from typing import Any

import pytest

from lmx.api.legacy_functions import functions_as_tools, with_function_call
from lmx.api.schemas import ChatCompletionRequest
from lmx.errors import RequestError

F = {"name": "f", "parameters": {"type": "object"}}
CALL = {"name": "f", "arguments": '{"x": 1}'}


def test_functions_and_their_choice_are_tools_with_one_call() -> None:
    body = functions_as_tools({"messages": [], "functions": [F], "function_call": {"name": "f"}})
    assert body["tools"] == [{"type": "function", "function": F}]
    assert body["tool_choice"] == {"type": "function", "function": {"name": "f"}}
    assert body["parallel_tool_calls"] is False and body["legacy_functions"] is True
    assert functions_as_tools({"functions": [F], "function_call": "none"})["tool_choice"] == "none"
    assert "legacy_functions" not in functions_as_tools({"tools": [], "messages": []})


def test_a_function_call_and_its_result_are_a_tool_call_and_its_answer() -> None:
    messages: list[Any] = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": None, "function_call": CALL},
        {"role": "function", "name": "f", "content": "42"},
        {"role": "function", "name": "f", "content": "no call before it"},
    ]
    chat = ChatCompletionRequest.model_validate({"model": "m", "messages": messages})
    assistant, result, stray = chat.messages[1:]
    assert assistant.tool_calls is not None and assistant.tool_calls[0].id == "call_1"
    assert assistant.tool_calls[0].function.name == "f"
    assert (result.role, result.tool_call_id, result.content) == ("tool", "call_1", "42")
    assert (stray.role, stray.tool_call_id) == ("tool", "call_3")
    assert not chat.legacy_functions  # an answer of the newer shape: no functions were given


@pytest.mark.parametrize(
    ("body", "param", "message"),
    [
        ({"function_call": "auto"}, "function_call", "function_call needs functions"),
        ({"functions": [F], "tools": []}, "functions", "give tools or functions, not both"),
        (
            {"functions": [F], "function_call": "auto", "tool_choice": "auto"},
            "function_call",
            "give tool_choice or function_call, not both",
        ),
        ({"functions": F}, "functions", "functions must be a list of functions"),
        (
            {"messages": [{"role": "assistant", "function_call": "f"}]},
            "messages[0].function_call",
            "messages[0].function_call must be an object with name and arguments",
        ),
    ],
)
def test_bad_function_fields_are_named(body: dict[str, Any], param: str, message: str) -> None:
    with pytest.raises(RequestError) as info:
        functions_as_tools(body)
    assert (info.value.param, str(info.value)) == (param, message)


def test_an_answers_call_goes_back_as_the_function_call() -> None:
    call = {"id": "call_x", "type": "function", "function": CALL}
    whole = {"index": 0, "message": {"content": None, "tool_calls": [call]}}
    assert with_function_call({**whole, "finish_reason": "tool_calls"}, "message") == {
        "index": 0,
        "message": {"content": None, "function_call": CALL},
        "finish_reason": "function_call",
    }
    more = {"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": "}"}}]}}
    assert with_function_call({**more, "finish_reason": None}, "delta")["delta"] == {
        "function_call": {"arguments": "}"}
    }
    said = {"index": 0, "message": {"content": "hi"}, "finish_reason": "length"}
    assert with_function_call(said, "message") == said
