"""Custom tools in chat completions (lmx.api.freeform): functions of one string to the model,
their calls the client's custom calls."""

from __future__ import annotations

import json
from typing import Any

import pytest

from lmx.api.freeform import FREEFORM, CustomDeltas, custom_call
from lmx.api.schemas import ChatCompletionRequest
from lmx.errors import RequestError

PATCH: dict[str, Any] = {
    "type": "custom",
    "custom": {"name": "apply_patch", "description": "Edit."},
}
WEATHER: dict[str, Any] = {"type": "function", "function": {"name": "get_weather"}}
ASK = [{"role": "user", "content": "Add a file."}]


def _request(**fields: Any) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"model": "m", "messages": ASK, **fields})


def test_a_custom_tool_reaches_the_model_as_a_function_of_its_input() -> None:
    sent_back = {"id": "c1", "type": "custom", "custom": {"name": "apply_patch", "input": "é\n"}}
    body = _request(
        tools=[WEATHER, PATCH],
        tool_choice={"type": "custom", "custom": {"name": "apply_patch"}},
        messages=[
            *ASK,
            {"role": "assistant", "content": None, "tool_calls": [sent_back]},
            {"role": "tool", "tool_call_id": "c1", "content": "Done!"},
        ],
    )
    assert body.custom_tool_names == {"apply_patch"}
    weather, patch = body.tools or []
    assert weather.function.name == "get_weather"
    assert (patch.function.name, patch.function.parameters) == ("apply_patch", FREEFORM)
    assert patch.function.description == "Edit.\n\nIts input is plain text, given as `input`."
    assert body.tool_choice is not None and body.forces_call
    (call,) = body.messages[1].tool_calls or []
    assert (call.id, call.function.name) == ("c1", "apply_patch")
    assert isinstance(call.function.arguments, str)
    assert json.loads(call.function.arguments) == {"input": "é\n"}
    allowed = {"type": "custom", "custom": {"name": "apply_patch"}}
    choice = {"type": "allowed_tools", "allowed_tools": {"mode": "required", "tools": [allowed]}}
    assert [
        t.function.name for t in _request(tools=[WEATHER, PATCH], tool_choice=choice).callable_tools
    ] == ["apply_patch"]
    assert _request(tools=[WEATHER]).custom_tool_names == frozenset()
    # Sent back in a turn that gives no tools again: the function's call all the same.
    turn = [*ASK, {"role": "assistant", "tool_calls": [sent_back]}]
    (again,) = _request(messages=turn).messages[1].tool_calls or []
    assert json.loads(str(again.function.arguments)) == {"input": "é\n"}


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"tools": [{"type": "custom", "custom": {}}]}, "tools[0].custom.name"),
        (
            {"tools": [{"type": "custom", "custom": {"name": "p", "format": {"type": "x"}}}]},
            "tools[0].custom.format",
        ),
        ({"tools": [PATCH], "tool_choice": {"type": "custom"}}, "tool_choice.custom.name"),
        (
            {
                "tools": [PATCH],
                "messages": [
                    *ASK,
                    {
                        "role": "assistant",
                        "tool_calls": [
                            {"id": "c", "type": "custom", "custom": {"name": "p", "input": 1}}
                        ],
                    },
                ],
            },
            "messages[1].tool_calls[0].custom.input",
        ),
    ],
)
def test_a_malformed_custom_tool_is_refused_naming_its_field(
    fields: dict[str, Any], param: str
) -> None:
    with pytest.raises(RequestError) as info:
        _request(**fields)
    assert info.value.param == param


def test_a_custom_call_answered_whole_holds_its_input() -> None:
    call = {
        "id": "c1",
        "type": "function",
        "function": {"name": "p", "arguments": '{"input": "a\\nb"}'},
    }
    assert custom_call(call) == {
        "id": "c1",
        "type": "custom",
        "custom": {"name": "p", "input": "a\nb"},
    }


def test_a_custom_call_streams_its_input_as_it_is_written() -> None:
    deltas = CustomDeltas(frozenset({"p"}))
    begun = {
        "index": 0,
        "id": "c1",
        "type": "function",
        "function": {"name": "p", "arguments": '{"inp'},
    }
    assert deltas.rewrite([begun], {}) == [
        {"index": 0, "id": "c1", "type": "custom", "custom": {"name": "p", "input": ""}}
    ]
    more = {"index": 0, "function": {"arguments": 'ut": "caf\\u00'}}
    assert deltas.rewrite([more], {}) == [{"index": 0, "custom": {"input": "caf"}}]
    arguments = '{"input": "caf\\u00e9 ok"}'
    last = {"index": 0, "function": {"arguments": 'e9 ok"}'}}
    assert deltas.rewrite([last], {0: arguments}) == [{"index": 0, "custom": {"input": "é ok"}}]
    # A function's call beside it goes as it came.
    weather = {
        "index": 1,
        "id": "c2",
        "type": "function",
        "function": {"name": "w", "arguments": "{}"},
    }
    assert deltas.rewrite([weather], {1: "{}"}) == [weather]


def test_a_custom_call_written_otherwise_goes_out_whole_at_its_end() -> None:
    deltas = CustomDeltas(frozenset({"p"}))
    begun = {
        "index": 0,
        "id": "c1",
        "type": "function",
        "function": {"name": "p", "arguments": '{"patch": "x'},
    }
    assert deltas.rewrite([begun], {}) == [
        {"index": 0, "id": "c1", "type": "custom", "custom": {"name": "p", "input": ""}}
    ]
    assert deltas.rewrite(
        [{"index": 0, "function": {"arguments": '"}'}}], {0: '{"patch": "x"}'}
    ) == [{"index": 0, "custom": {"input": "x"}}]
