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


def test_a_mistral_template_gets_call_ids_it_takes_and_the_same_for_call_and_reply() -> None:
    # Mistral's templates refuse ids other than 9 letters and digits (OpenAI's are call_...).
    call = {"id": "call_0SPnmtqs8WTFokV4l4iPvJcj", "type": "function"}
    call["function"] = {"name": "f", "arguments": "{}"}
    body = ChatCompletionRequest.model_validate(
        {
            "model": "m",
            "messages": [
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": None, "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "call_0SPnmtqs8WTFokV4l4iPvJcj", "content": "2"},
            ],
        }
    )
    _, said, reply = chat_messages(body, mistral=True)
    (made,) = [c["id"] for c in said["tool_calls"]]
    assert len(made) == 9 and made.isalnum() and reply["tool_call_id"] == made
    _, said, reply = chat_messages(body)  # any other template: as sent
    assert said["tool_calls"][0]["id"] == reply["tool_call_id"] == call["id"]
