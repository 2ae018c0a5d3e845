"""The Responses API's mapping onto a chat request, and its output items and stream events."""

from __future__ import annotations

import json
from typing import Any

import pytest

from lmx.api.generation import CallBegun, CallEnded, CallText, ChoiceState
from lmx.api.response_store import ResponseStore
from lmx.api.responses import Rendering, chat_request, conversation, keeper, responses_error
from lmx.api.schemas import ResponsesRequest
from lmx.errors import GenerationFailed, RequestError, ResponseNotFound
from lmx.runtime.parsers import Content, Reasoning, ToolCall, make_parser
from tests.sse import named_events

CALL = ToolCall("call_1", "add", '{"a": 1, "b": 2}')


def _request(**fields: Any) -> ResponsesRequest:
    return ResponsesRequest.model_validate({"model": "m", **fields})


_THOUGHT = {"type": "reasoning_text", "text": "To add, call add."}


def test_input_items_become_the_chat_they_stand_for() -> None:
    body = _request(
        instructions="Be brief.",
        input=[
            {"type": "reasoning", "id": "rs_0", "summary": [{"type": "summary_text", "text": "?"}]},
            {"role": "user", "content": [{"type": "input_text", "text": "Add 1 and 2."}]},
            {"type": "reasoning", "id": "rs_1", "summary": [], "content": [_THOUGHT]},
            {"type": "message", "role": "assistant", "content": "Let me add."},
            {"type": "reasoning", "id": "rs_2", "summary": [{"type": "summary_text", "text": "!"}]},
            {"type": "function_call", "call_id": "call_1", "name": "add", "arguments": "{}"},
            {"type": "function_call_output", "call_id": "call_1", "output": "3"},
            {"type": "reasoning", "id": "rs_3", "encrypted_content": "gAAAA"},
            {"type": "function_call", "call_id": "call_2", "name": "add", "arguments": "{}"},
        ],
        reasoning={"effort": "none"},
        max_output_tokens=9,
        text={"format": {"type": "json_object"}},
    )
    chat = chat_request(body, conversation(ResponseStore(), body))
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
            # Each reasoning item is the reasoning of the assistant message it comes before
            # (a summary where it has no text of its own), none of a user's.
            "reasoning_content": "To add, call add.!",
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "3"},
        {
            "role": "assistant",
            "tool_calls": [
                {"id": "call_2", "type": "function", "function": {"name": "add", "arguments": "{}"}}
            ],
        },
    ]
    assert chat.max_completion_tokens == 9
    assert chat.response_format is not None and chat.response_format.type == "json_object"
    assert chat.reasoning_effort == "none"


def test_an_image_a_tool_gave_back_is_a_note_an_image_from_the_user_a_400() -> None:
    image = {"type": "input_image", "image_url": "data:image/png;base64,"}
    look = {"type": "input_text", "text": "plot.png:"}
    call = {"type": "function_call", "call_id": "call_1", "name": "view_image", "arguments": "{}"}
    body = _request(
        input=[call, {"type": "function_call_output", "call_id": "call_1", "output": [look, image]}]
    )
    tool = chat_request(body, conversation(ResponseStore(), body)).messages[-1]
    note = "[an image the tool gave back, not shown: this model reads text only]"
    assert tool.content == f"plot.png:{note}"
    body = _request(input=[{"role": "user", "content": [image]}])
    with pytest.raises(RequestError, match=r"input\[0\]\.content\[0\] is of type 'input_image'"):
        conversation(ResponseStore(), body)


def _state(finish: str, error: str | None = None) -> ChoiceState:
    state = ChoiceState(0, make_parser(tool_parser=None, tools_enabled=False, reasoning=False))
    state.reasoning, state.content, state.tool_calls = ["think ", "more"], ["Hi"], [CALL]
    state.finish_reason, state.error = finish, error
    state.prompt_tokens, state.completion_tokens, state.reasoning_tokens = 5, 30, 2
    return state


def test_a_stream_opens_and_closes_each_item_in_turn() -> None:
    r = Rendering(_request(input="x", stream=True))
    stream = r.started(
        ChoiceState(0, make_parser(tool_parser=None, tools_enabled=False, reasoning=False))
    )
    call = [CallBegun(0, "call_1", "add"), CallText(0, '{"a": 1, '), CallText(0, '"b": 2}')]
    stream += r.feed([Reasoning("think "), Reasoning("more"), Content("Hi"), *call])
    stream += r.feed([CallEnded(0, CALL)])
    stream += r.ended(_state("tool_calls"))
    events = named_events(stream)
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


@pytest.mark.parametrize(
    ("arguments", "status"),
    [('{"a": 1}', "completed"), ('{"a": ', "incomplete"), ("", "incomplete")],
)
def test_a_function_call_cut_off_by_max_output_tokens_is_an_incomplete_item(
    arguments: str, status: str
) -> None:
    r = Rendering(_request(input="x", stream=True))
    call = ToolCall("call_1", "add", arguments)
    stream = r.feed([CallBegun(0, "call_1", "add"), CallText(0, arguments), CallEnded(0, call)])
    done = next(e for e in named_events(stream) if e["type"] == "response.output_item.done")
    assert done["item"]["status"] == status and done["item"]["arguments"] == arguments


def test_a_failed_generation_ends_the_stream_failed_and_the_answer_a_500() -> None:
    r = Rendering(_request(input="x", stream=True))
    events = named_events(r.feed([Content("Hi")]) + r.ended(_state("error", "the worker died")))
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
    final = named_events(r.ended(state))[-1]["response"]
    answer = Rendering(_request(input="x")).answer(state)
    for response in (final, answer):
        assert [(o["type"], o["content"][0]["text"]) for o in response["output"]] == [
            ("message", "")
        ]


def _answered(store: ResponseStore, **fields: Any) -> dict[str, Any]:
    """The response to a request of `fields`, kept in `store` as the endpoint keeps it."""
    body = _request(**fields)
    return Rendering(body, keeper(store, body, conversation(store, body))).answer(_state("stop"))


def _chat(store: ResponseStore, **fields: Any) -> list[dict[str, Any]]:
    body = _request(**fields)
    chat = chat_request(body, conversation(store, body))
    return [m.model_dump(exclude_none=True) for m in chat.messages]


def test_a_kept_response_is_continued_as_its_conversation_and_answer() -> None:
    store = ResponseStore()
    body = _request(instructions="Be brief.", input="Add 1 and 2.")
    first = Rendering(body, keeper(store, body, conversation(store, body))).answer(
        _state("tool_calls")
    )
    assert first["store"] is True and store.get(first["id"]) == first
    follow = [{"type": "function_call_output", "call_id": "call_1", "output": "3"}]
    # Its instructions are not carried over; its reasoning, text and calls are.
    assert _chat(
        store, input=follow, previous_response_id=first["id"], instructions="Be kind."
    ) == [
        {"role": "system", "content": "Be kind."},
        {"role": "user", "content": "Add 1 and 2."},
        {
            "role": "assistant",
            "content": "Hi",
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "add", "arguments": '{"a": 1, "b": 2}'},
                }
            ],
            "reasoning_content": "think more",
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "3"},
    ]
    second = _answered(store, input=follow, previous_response_id=first["id"])
    assert second["previous_response_id"] == first["id"]
    assert [
        m["role"] for m in _chat(store, input="Thanks.", previous_response_id=second["id"])
    ] == [
        "user",
        "assistant",
        "tool",
        "assistant",
        "user",
    ]


def test_reasoning_sent_back_as_its_encrypted_content_alone_is_read_again() -> None:
    # Codex asks for it with store: false, and sends back a reasoning item without its text.
    body = _request(input="Add 1 and 2.", store=False, include=["reasoning.encrypted_content"])
    answer = Rendering(body).answer(_state("tool_calls"))
    thought = {k: v for k, v in answer["output"][0].items() if k != "content"}
    assert thought["encrypted_content"] and "think" not in thought["encrypted_content"]
    call = {"type": "function_call", "call_id": "c", "name": "add", "arguments": "{}"}
    messages = _chat(
        ResponseStore(), input=[{"role": "user", "content": "Add 1 and 2."}, thought, call]
    )
    assert messages[1]["reasoning_content"] == "think more"
    # Another server's is not lmx's to read, and one that lmx's mark begins is checked.
    foreign = {**thought, "encrypted_content": "gAAAAABo", "summary": []}
    assert "reasoning_content" not in _chat(ResponseStore(), input=[foreign, call])[0]
    broken = {**thought, "encrypted_content": thought["encrypted_content"] + "%"}
    with pytest.raises(RequestError) as caught:
        _chat(ResponseStore(), input=[broken, call])
    assert caught.value.param == "input[0].encrypted_content"
    assert (
        "encrypted_content"
        not in Rendering(_request(input="x")).answer(_state("stop"))["output"][0]
    )


def test_responses_not_stored_or_failed_are_not_kept() -> None:
    store = ResponseStore()
    body = _request(input="x", store=False)
    assert keeper(store, body, conversation(store, body)) is None
    assert Rendering(body).answer(_state("stop"))["store"] is False
    failing = _request(input="x")
    r = Rendering(failing, keeper(store, failing, conversation(store, failing)))
    with pytest.raises(GenerationFailed):
        r.answer(_state("error", "the worker died"))
    streamed = Rendering(failing, keeper(store, failing, conversation(store, failing)))
    streamed.ended(_state("error", "the worker died"))
    assert len(store) == 0 and store.nbytes == 0


def test_an_unknown_previous_response_is_a_400_clients_recognise() -> None:
    with pytest.raises(RequestError) as caught:
        conversation(ResponseStore(), _request(input="x", previous_response_id="resp_gone"))
    assert (caught.value.param, caught.value.code) == (
        "previous_response_id",
        "previous_response_not_found",
    )
    assert "resp_gone" in str(caught.value)


def test_beyond_its_bytes_the_store_drops_the_least_recently_used_conversation() -> None:
    store = ResponseStore()
    a = _answered(store, input="a")
    b = _answered(store, input="b", previous_response_id=a["id"])
    c = _answered(store, input="c" * 500)
    store.max_bytes = store.nbytes  # full
    # Continuing b uses b, and a before it: c is now the least recently used.
    d = _answered(store, input="d", previous_response_id=b["id"])
    assert len(store) == 3 and store.nbytes <= store.max_bytes
    with pytest.raises(ResponseNotFound):
        store.get(c["id"])
    assert [store.get(r["id"])["id"] for r in (a, b, d)] == [a["id"], b["id"], d["id"]]
    # One larger than the whole store is answered, not kept.
    big = _answered(store, input="e" * store.max_bytes)
    with pytest.raises(ResponseNotFound):
        store.get(big["id"])
    assert len(store) == 3


def test_a_deleted_response_is_gone_and_those_continuing_it_are_not() -> None:
    store = ResponseStore()
    a = _answered(store, input="a")
    b = _answered(store, input="b", previous_response_id=a["id"])
    store.delete(a["id"])
    for gone in (store.get, store.delete):
        with pytest.raises(ResponseNotFound, match=a["id"]):
            gone(a["id"])
    assert [m["content"] for m in _chat(store, input="c", previous_response_id=b["id"])] == [
        "a",
        "Hi",
        "b",
        "Hi",
        "c",
    ]
    store.delete(b["id"])
    assert len(store) == 0 and store.nbytes == 0


@pytest.mark.parametrize(
    ("chat", "responses"),
    [
        ("messages", "input"),
        ("messages[3].content", "input"),
        ("max_tokens", "max_output_tokens"),
        ("max_completion_tokens", "max_output_tokens"),
        ("response_format.json_schema.schema", "text.format.schema"),
        ("tool_choice.function.name", "tool_choice.name"),
        ("tool_choice.allowed_tools.tools[1].function.name", "tool_choice.tools[1].name"),
        ("tools[2].function.parameters", "tools[2].parameters"),
        ("temperature", "temperature"),
    ],
)
def test_an_error_of_the_chat_request_names_the_responses_field(chat: str, responses: str) -> None:
    error = responses_error(RequestError(f"{chat}: bad", param=chat, code="c"))
    assert (error.param, str(error), error.code) == (responses, f"{responses}: bad", "c")


def test_a_kept_response_lists_its_input_items_a_page_at_a_time() -> None:
    store = ResponseStore()
    said = _answered(store, input="Add 1 and 2.")
    (item,) = store.input_items(said["id"], limit=20, order="desc", after=None)["data"]
    assert item | {"id": ""} == {
        "id": "",
        "type": "message",
        "role": "user",
        "content": [{"type": "input_text", "text": "Add 1 and 2."}],
    }
    assert item["id"].startswith("msg_")
    given = [
        {"role": "user", "content": "u"},
        {"type": "message", "role": "assistant", "content": "a", "id": "msg_given"},
        {"type": "function_call", "call_id": "c", "name": "add", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "c", "output": "3"},
        {"role": "user", "content": [{"type": "input_text", "text": "more"}]},
    ]
    answered = _answered(store, input=given, previous_response_id=said["id"])

    def page(**how: Any) -> dict[str, Any]:
        return store.input_items(
            answered["id"], **{"limit": 2, "order": "asc", "after": None} | how
        )

    first = page()
    assert [i["type"] for i in first["data"]] == ["message", "message"]
    assert first["data"][1]["id"] == "msg_given" and first["last_id"] == "msg_given"
    assert first["data"][1]["content"] == [{"type": "output_text", "text": "a"}]
    assert first["has_more"] is True
    rest = page(after=first["last_id"], limit=20)
    assert [i["type"] for i in rest["data"]] == [
        "function_call",
        "function_call_output",
        "message",
    ]
    assert rest["has_more"] is False and rest["data"][-1]["content"] == given[-1]["content"]
    newest = page(order="desc", limit=1)
    assert newest["data"] == rest["data"][-1:] and newest["has_more"] is True
    with pytest.raises(RequestError) as caught:
        page(after="msg_unknown")
    assert caught.value.param == "after"


PATCH = '*** Begin Patch\n*** Add File: a.txt\n+hi "there"\n*** End Patch'
APPLY_PATCH = {
    "type": "custom",
    "name": "apply_patch",
    "description": "Edit files.",
    "format": {"type": "grammar", "syntax": "lark", "definition": 'start: "*** Begin Patch" /.+/s'},
}


def test_a_custom_tool_is_a_function_of_one_string_and_its_calls_come_back_as_chat() -> None:
    body = _request(
        input=[
            {"role": "user", "content": "Add a.txt."},
            {
                "type": "custom_tool_call",
                "call_id": "call_1",
                "name": "apply_patch",
                "input": PATCH,
            },
            {"type": "custom_tool_call_output", "call_id": "call_1", "output": "Done!"},
        ],
        tools=[APPLY_PATCH, {"type": "custom", "name": "note"}],
        tool_choice={"type": "custom", "name": "apply_patch"},
    )
    chat = chat_request(body, conversation(ResponseStore(), body))
    functions = [t.function for t in chat.tools or ()]
    assert [f.name for f in functions] == ["apply_patch", "note"]
    string = {"type": "object", "properties": {"input": {"type": "string"}}}
    assert all(f.parameters and f.parameters.items() >= string.items() for f in functions)
    # Where its input goes, and its grammar, are told to the model.
    assert functions[0].description == (
        "Edit files.\n\nIts input, given as `input`, is text in this lark grammar:\n"
        'start: "*** Begin Patch" /.+/s'
    )
    assert functions[1].description == "Its input is plain text, given as `input`."
    assert chat.tool_choice is not None and chat.tool_choice.model_dump()["function"] == {
        "name": "apply_patch"
    }
    messages = [m.model_dump(exclude_none=True) for m in chat.messages]
    (call,) = messages[1]["tool_calls"]
    assert call["function"] == {"name": "apply_patch", "arguments": json.dumps({"input": PATCH})}
    assert messages[2] == {"role": "tool", "tool_call_id": "call_1", "content": "Done!"}


@pytest.mark.parametrize(
    "fmt",
    [
        {"type": "grammar", "syntax": "ebnf", "definition": "x"},
        {"type": "grammar", "syntax": "lark"},
        {"type": "json"},
        "text",
    ],
)
def test_a_custom_tool_of_an_unknown_format_is_a_400_naming_it(fmt: Any) -> None:
    body = _request(input="x", tools=[{"type": "custom", "name": "f", "format": fmt}])
    with pytest.raises(RequestError, match=r"tools\[0\]\.format") as info:
        chat_request(body, ())
    assert info.value.param == "tools[0].format"


@pytest.mark.parametrize(
    ("arguments", "given"),
    [
        (json.dumps({"input": PATCH}), PATCH),
        (json.dumps({"patch": PATCH}), PATCH),  # its one string, named otherwise by the model
        ('{"input": "*** Begin\\u00', "*** Begin"),  # cut off by max_output_tokens
        ('{"input": 3}', '{"input": 3}'),
        ("not json", "not json"),
    ],
)
def test_a_custom_tools_call_streams_as_its_item_with_its_input_text(
    arguments: str, given: str
) -> None:
    r = Rendering(_request(input="x", stream=True, tools=[APPLY_PATCH]))
    call = ToolCall("call_1", "apply_patch", arguments)
    stream = r.feed([CallBegun(0, "call_1", "apply_patch"), CallText(0, arguments[:5])])
    stream += r.feed([CallText(0, arguments[5:]), CallEnded(0, call)])
    state = _state("tool_calls")
    state.reasoning, state.content, state.tool_calls = [], [], [call]
    stream += r.ended(state)
    events = named_events(stream)
    assert [(e["type"], e.get("output_index")) for e in events] == [
        ("response.output_item.added", 0),
        ("response.custom_tool_call_input.delta", 0),
        ("response.custom_tool_call_input.done", 0),
        ("response.output_item.done", 0),
        ("response.completed", None),
    ]
    assert events[0]["item"] | {"id": ""} == {
        "type": "custom_tool_call",
        "id": "",
        "call_id": "call_1",
        "name": "apply_patch",
        "input": "",
    }
    assert events[1]["delta"] == events[2]["input"] == given
    (item,) = events[-1]["response"]["output"]
    assert item == events[3]["item"] and item["input"] == given
    answer = Rendering(_request(input="x", tools=[APPLY_PATCH])).answer(state)
    assert [(o["type"], o["input"]) for o in answer["output"]] == [("custom_tool_call", given)]


def test_a_kept_custom_call_is_continued_with_its_output() -> None:
    store = ResponseStore()
    body = _request(input="Add a.txt.", tools=[APPLY_PATCH])
    state = _state("tool_calls")
    state.reasoning, state.content = [], []
    state.tool_calls = [ToolCall("call_1", "apply_patch", json.dumps({"input": PATCH}))]
    said = Rendering(body, keeper(store, body, conversation(store, body))).answer(state)
    output = {"type": "custom_tool_call_output", "call_id": "call_1", "output": "Done!"}
    messages = _chat(store, input=[output], previous_response_id=said["id"], tools=[APPLY_PATCH])
    assert [m["role"] for m in messages] == ["user", "assistant", "tool"]
    assert json.loads(messages[1]["tool_calls"][0]["function"]["arguments"]) == {"input": PATCH}


def test_a_local_shell_tool_is_a_function_of_argv_and_its_calls_and_outputs_come_back() -> None:
    action = {"type": "exec", "command": ["ls", "-a"], "env": {}, "working_directory": "/tmp"}
    body = _request(
        input=[
            {"role": "user", "content": "List the files."},
            {"type": "local_shell_call", "id": "lsh_1", "call_id": "call_1", "action": action},
            {"type": "local_shell_call_output", "id": "call_1", "output": "a.txt"},
        ],
        tools=[{"type": "local_shell"}],
    )
    chat = chat_request(body, conversation(ResponseStore(), body))
    (function,) = [t.function for t in chat.tools or ()]
    assert function.name == "local_shell" and function.parameters is not None
    assert function.parameters["required"] == ["command"]
    messages = [m.model_dump(exclude_none=True) for m in chat.messages]
    (call,) = messages[1]["tool_calls"]
    assert call["id"] == "call_1" and call["function"]["name"] == "local_shell"
    assert json.loads(call["function"]["arguments"]) == {
        "command": ["ls", "-a"],
        "env": {},
        "working_directory": "/tmp",
    }
    assert messages[2] == {"role": "tool", "tool_call_id": "call_1", "content": "a.txt"}
    bad = _request(input=[{"type": "local_shell_call", "call_id": "c", "action": {"type": "exec"}}])
    with pytest.raises(RequestError, match=r"input\[0\]\.action needs a command"):
        chat_request(bad, conversation(ResponseStore(), bad))


@pytest.mark.parametrize(
    ("arguments", "command", "status"),
    [
        ('{"command": ["ls", "-a"], "timeout_ms": 500}', ["ls", "-a"], "completed"),
        ('{"command": "ls -a | wc"}', ["bash", "-lc", "ls -a | wc"], "completed"),
        ('{"command": ["ls", "-', [], "incomplete"),  # cut off by max_output_tokens
    ],
)
def test_a_local_shell_call_is_its_item_with_the_action_to_run(
    arguments: str, command: list[str], status: str
) -> None:
    r = Rendering(_request(input="x", stream=True, tools=[{"type": "local_shell"}]))
    call = ToolCall("call_1", "local_shell", arguments)
    stream = r.feed([CallBegun(0, "call_1", "local_shell"), CallText(0, arguments)])
    stream += r.feed([CallEnded(0, call)])
    events = named_events(stream)
    assert [e["type"] for e in events] == [
        "response.output_item.added",
        "response.output_item.done",
    ]
    item = events[-1]["item"]
    assert (item["type"], item["call_id"], item["status"]) == ("local_shell_call", "call_1", status)
    assert item["action"]["type"] == "exec" and item["action"]["command"] == command
    if status == "completed" and "timeout" in arguments:
        assert item["action"]["timeout_ms"] == 500


@pytest.mark.parametrize("size", [1, 2, 3, 5, 7, 11])
def test_a_custom_tools_input_is_unescaped_whatever_the_pieces_it_comes_in(size: int) -> None:
    text = 'a "quote" \\ back\\slash\ttab é \U0001f600 \u2028 end'
    arguments = ' { "input" : ' + json.dumps(text) + " }"
    r = Rendering(_request(input="x", stream=True, tools=[{"type": "custom", "name": "edit"}]))
    pieces = [CallText(0, arguments[i : i + size]) for i in range(0, len(arguments), size)]
    stream = r.feed([CallBegun(0, "call_1", "edit"), *pieces])
    streamed = [e["delta"] for e in named_events(stream) if e["type"].endswith("input.delta")]
    assert "".join(streamed) == text  # all of it before the call's end
    end = named_events(r.feed([CallEnded(0, ToolCall("call_1", "edit", arguments))]))
    kinds = ["response.custom_tool_call_input.done", "response.output_item.done"]
    assert [e["type"] for e in end] == kinds
    assert end[0]["input"] == r.output[-1]["input"] == text


def test_allowed_tools_name_the_tools_as_the_chat_does() -> None:
    tools = [APPLY_PATCH, {"type": "local_shell"}, {"type": "function", "name": "add"}]
    allowed = [{"type": "custom", "name": "apply_patch"}, {"type": "local_shell"}]
    choice = {"type": "allowed_tools", "mode": "required", "tools": allowed}
    body = _request(input="x", tools=tools, tool_choice=choice)
    chat = chat_request(body, conversation(ResponseStore(), body))
    assert chat.forces_call and [t.function.name for t in chat.callable_tools] == [
        "apply_patch",
        "local_shell",
    ]
    bad = _request(
        input="x", tools=tools, tool_choice={**choice, "tools": [{"type": "web_search"}]}
    )
    with pytest.raises(RequestError) as info:
        chat_request(bad, conversation(ResponseStore(), bad))
    assert info.value.param == "tool_choice.tools[0]"
