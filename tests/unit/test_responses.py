"""The Responses API's mapping onto a chat request, and its output items and stream events."""

from __future__ import annotations

import json
from typing import Any

import pytest

from lmx.api.generation import ChoiceState
from lmx.api.responses import Rendering, chat_request
from lmx.api.schemas import ResponsesRequest
from lmx.errors import GenerationFailed
from lmx.runtime.parsers import Content, Reasoning, ToolCall, make_parser

CALL = ToolCall("call_1", "add", '{"a": 1, "b": 2}')


def _request(**fields: Any) -> ResponsesRequest:
    return ResponsesRequest.model_validate({"model": "m", **fields})


def test_input_items_become_the_chat_they_stand_for() -> None:
    chat = chat_request(
        _request(
            instructions="Be brief.",
            input=[
                {"role": "user", "content": [{"type": "input_text", "text": "Add 1 and 2."}]},
                {"type": "reasoning", "id": "rs_1", "summary": []},
                {"type": "message", "role": "assistant", "content": "Let me add."},
                {"type": "function_call", "call_id": "call_1", "name": "add", "arguments": "{}"},
                {"type": "function_call_output", "call_id": "call_1", "output": "3"},
            ],
            reasoning={"effort": "none"},
            max_output_tokens=9,
            text={"format": {"type": "json_object"}},
        )
    )
    messages = [m.model_dump(exclude_none=True) for m in chat.messages]
    assert messages == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Add 1 and 2."},
        {
            "role": "assistant",
            "content": "Let me add.",
            "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "add", "arguments": "{}"}}
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "3"},
    ]
    assert chat.max_completion_tokens == 9
    assert chat.response_format is not None and chat.response_format.type == "json_object"
    assert chat.chat_template_kwargs == {"enable_thinking": False}


def _events(stream: bytes) -> list[dict[str, Any]]:
    out = []
    for block in stream.decode().split("\n\n"):
        if block:
            kind, data = block.split("\n")
            event = json.loads(data.removeprefix("data: "))
            assert kind == f"event: {event['type']}"
            out.append(event)
    return out


def _state(finish: str, error: str | None = None) -> ChoiceState:
    state = ChoiceState(0, make_parser(tool_parser=None, tools_enabled=False, reasoning=False))
    state.reasoning, state.content, state.tool_calls = ["think ", "more"], ["Hi"], [CALL]
    state.finish_reason, state.error = finish, error
    state.prompt_tokens, state.completion_tokens, state.reasoning_tokens = 5, 30, 2
    return state


def test_a_stream_opens_and_closes_each_item_in_turn() -> None:
    r = Rendering(_request(input="x", stream=True))
    stream = r.started()
    stream += r.feed([Reasoning("think "), Reasoning("more"), Content("Hi"), CALL])
    stream += r.ended(_state("tool_calls"))
    events = _events(stream)
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    assert [(e["type"], e.get("output_index")) for e in events] == [
        ("response.created", None),
        ("response.in_progress", None),
        ("response.output_item.added", 0),
        ("response.reasoning_text.delta", 0),
        ("response.reasoning_text.delta", 0),
        ("response.reasoning_text.done", 0),
        ("response.output_item.done", 0),
        ("response.output_item.added", 1),
        ("response.content_part.added", 1),
        ("response.output_text.delta", 1),
        ("response.output_text.done", 1),
        ("response.content_part.done", 1),
        ("response.output_item.done", 1),
        ("response.output_item.added", 2),
        ("response.function_call_arguments.delta", 2),
        ("response.function_call_arguments.done", 2),
        ("response.output_item.done", 2),
        ("response.completed", None),
    ]
    final = events[-1]["response"]
    assert [o["type"] for o in final["output"]] == ["reasoning", "message", "function_call"]
    assert final["output"][0]["content"] == [{"type": "reasoning_text", "text": "think more"}]
    assert final["output"][1]["content"][0]["text"] == "Hi"
    assert final["output"][2] | {"id": ""} == {
        "type": "function_call",
        "id": "",
        "call_id": "call_1",
        "name": "add",
        "arguments": '{"a": 1, "b": 2}',
        "status": "completed",
    }
    answer = Rendering(_request(input="x")).answer(_state("tool_calls"))
    assert [o["type"] for o in answer["output"]] == ["reasoning", "message", "function_call"]
    assert answer["usage"]["output_tokens_details"] == {"reasoning_tokens": 2}
    assert answer["status"] == "completed" and answer["store"] is False


def test_a_failed_generation_ends_the_stream_failed_and_the_answer_a_500() -> None:
    r = Rendering(_request(input="x", stream=True))
    events = _events(r.feed([Content("Hi")]) + r.ended(_state("error", "the worker died")))
    assert [e["type"] for e in events][-2:] == ["response.output_item.done", "response.failed"]
    failed = events[-1]["response"]
    assert failed["status"] == "failed" and failed["output"][0]["status"] == "incomplete"
    assert failed["error"] == {"code": "server_error", "message": "the worker died"}
    with pytest.raises(GenerationFailed, match="the worker died"):
        Rendering(_request(input="x")).answer(_state("error", "the worker died"))


def test_an_answer_of_nothing_is_an_empty_message_streamed_or_not() -> None:
    state = _state("stop")
    state.reasoning, state.content, state.tool_calls = [], [], []
    r = Rendering(_request(input="x", stream=True))
    final = _events(r.ended(state))[-1]["response"]
    answer = Rendering(_request(input="x")).answer(state)
    for response in (final, answer):
        assert [(o["type"], o["content"][0]["text"]) for o in response["output"]] == [
            ("message", "")
        ]
