"""What the chat template receives from an OpenAI conversation."""

from __future__ import annotations

from lmx.api.generation import chat_messages
from lmx.api.schemas import ChatCompletionRequest


def test_a_tool_calls_arguments_reach_the_template_as_an_object() -> None:
    # Templates write `arguments | tojson`: the wire's JSON string would be encoded twice.
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"x": 1}'}}
    odd = {"id": "c2", "type": "function", "function": {"name": "g", "arguments": "not json"}}
    body = ChatCompletionRequest.model_validate(
        {
            "model": "m",
            "messages": [
                {"role": "developer", "content": "Be brief."},
                {"role": "user", "content": [{"type": "text", "text": "Hi"}]},
                {"role": "assistant", "content": None, "tool_calls": [call, odd]},
                {"role": "tool", "tool_call_id": "c1", "content": "2"},
            ],
        }
    )
    system, user, said, tool = chat_messages(body)
    assert system == {"role": "system", "content": "Be brief."}
    assert user == {"role": "user", "content": "Hi"}
    assert [c["function"]["arguments"] for c in said["tool_calls"]] == [{"x": 1}, "not json"]
    assert tool == {"role": "tool", "tool_call_id": "c1", "content": "2"}
