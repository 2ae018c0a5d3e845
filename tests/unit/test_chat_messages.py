"""What the chat template receives from an OpenAI conversation."""

from __future__ import annotations

from typing import Any

import jinja2
import pytest

from lmx.api.generation import chat_messages, chat_prompt, truncated_prompt
from lmx.api.schemas import ChatCompletionRequest
from lmx.errors import RequestError


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


def test_an_assistants_refusal_sent_back_is_what_it_said() -> None:
    refused = [{"type": "refusal", "refusal": "I can't help with that."}]
    body = ChatCompletionRequest.model_validate(
        {
            "model": "m",
            "messages": [
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": refused},
                {"role": "user", "content": refused},
            ],
        }
    )
    with pytest.raises(RequestError) as info:  # a user's part of that type is no text
        chat_messages(body)
    assert info.value.param == "messages[2].content[0].type"
    body.messages.pop()
    assert chat_messages(body)[1] == {"role": "assistant", "content": "I can't help with that."}


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
    _, said, reply = chat_messages(body, "mistral")
    (made,) = [c["id"] for c in said["tool_calls"]]
    assert len(made) == 9 and made.isalnum() and reply["tool_call_id"] == made
    _, said, reply = chat_messages(body)  # any other template: as sent
    assert said["tool_calls"][0]["id"] == reply["tool_call_id"] == call["id"]


def _conversation(turns: int) -> ChatCompletionRequest:
    """A system message, then `turns` turns of four messages (a user's, a tool call, its output,
    the answer); a developer message inside the second turn."""
    messages: list[dict[str, Any]] = [{"role": "system", "content": "S"}]
    for t in range(turns):
        call = {"id": f"c{t}", "type": "function", "function": {"name": "f", "arguments": "{}"}}
        messages += [
            {"role": "user", "content": f"u{t}"},
            {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": f"c{t}", "content": f"t{t}"},
            {"role": "assistant", "content": f"a{t}"},
        ]
        if t == 1:
            messages.insert(-3, {"role": "developer", "content": "D"})
    return ChatCompletionRequest.model_validate({"model": "m", "messages": messages})


def test_truncation_leaves_out_as_few_first_turns_as_fit() -> None:
    rendered: list[list[str]] = []

    def prompt_of(body: ChatCompletionRequest) -> list[int]:  # a token per message
        rendered.append([str(m.content) for m in body.messages])
        return list(range(len(body.messages)))

    body = _conversation(6)
    # Room for 18 messages: the system and developer ones, and the last four turns whole.
    assert len(truncated_prompt(body, prompt_of, 18)) == 18
    kept = next(r for r in reversed(rendered) if len(r) == 18)
    assert kept[:3] == ["S", "D", "u2"] and kept[-1] == "a5"
    rendered.clear()
    assert len(truncated_prompt(body, prompt_of, 6)) == 6  # the last turn alone
    assert len(rendered) == 3  # found by halving, not turn by turn (5)
    # Too little room even for the last turn: that turn, for the engine to refuse.
    assert truncated_prompt(body, prompt_of, 3) == list(range(6))
    # No turn to leave out: the conversation as it is.
    assert truncated_prompt(_conversation(1), prompt_of, 1) == list(range(5))


class _Template:
    """A model's tokenizer as chat_prompt sees it, keeping what its template was given."""

    tool_parser = None

    def __init__(self) -> None:
        self.given: dict[str, Any] = {}

    def apply_chat_template(
        self, messages: Any, *, tools: Any, add_generation_prompt: bool, extra: dict[str, Any]
    ) -> list[int]:
        self.given = extra
        return [1]


def test_reasoning_effort_reaches_the_template_and_none_turns_thinking_off() -> None:
    template = _Template()
    engine: Any = type("Engine", (), {"tokenizer": template})()

    def given(**fields: Any) -> dict[str, Any]:
        body = ChatCompletionRequest.model_validate(
            {"model": "m", "messages": [{"role": "user", "content": "Hi"}], **fields}
        )
        chat_prompt(body, engine, thinking=True)
        return template.given

    assert given() == {}
    assert given(reasoning_effort="high") == {"reasoning_effort": "high"}
    assert given(reasoning_effort="none") == {"reasoning_effort": "none", "enable_thinking": False}
    # The client's own template arguments win.
    kwargs = {"enable_thinking": True, "reasoning_effort": "low"}
    assert given(reasoning_effort="none", chat_template_kwargs=kwargs) == kwargs


def test_reasoning_sent_back_reaches_the_template_by_the_names_it_reads() -> None:
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    body = ChatCompletionRequest.model_validate(
        {
            "model": "m",
            "messages": [
                {"role": "user", "content": "Hi"},
                # As LM Studio answers gpt-oss and as Qwen3's clients send it back.
                {"role": "assistant", "reasoning": "Call f.", "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "c1", "content": "2"},
                {
                    "role": "assistant",
                    "content": "Also.",
                    "reasoning_content": "R",
                    "tool_calls": [call],
                },
                {"role": "tool", "tool_call_id": "c1", "content": "3"},
                {"role": "assistant", "content": "5", "reasoning_content": "Add."},
            ],
        }
    )
    _, called, _, also, _, answered = chat_messages(body)
    assert called["reasoning_content"] == "Call f." and "reasoning" not in called
    assert "thinking" not in called and also["reasoning_content"] == "R"
    # gpt-oss's template reads `thinking`, and refuses it beside a call's content.
    _, called, _, also, _, answered = chat_messages(body, "harmony")
    assert called["thinking"] == "Call f." and "thinking" not in also
    assert answered["thinking"] == "Add."


# As gpt-oss's template renders calls: the first of a message only, and a tool result under the
# name of the latest call before it (Llama 3's refuses a message of several).
FIRST_CALL_ONLY = (
    "{%- set last = namespace(name=none) %}{%- for m in messages %}"
    "{%- if m.role == 'assistant' and m.tool_calls %}{%- set c = m.tool_calls[0].function %}"
    "[{{ m.thinking ~ ' ' if m.thinking }}call {{ c.name }} {{ c.arguments | tojson }}]"
    "{%- set last.name = c.name %}"
    "{%- elif m.role == 'tool' %}[{{ last.name }}: {{ m.content }}]"
    "{%- else %}[{{ m.role }}: {{ m.content }}]{%- endif %}{%- endfor %}"
)


def test_gpt_oss_and_llama_3_get_each_call_of_a_message_followed_by_its_own_result() -> None:
    def call(id_: str, name: str) -> dict[str, Any]:
        return {"id": id_, "type": "function", "function": {"name": name, "arguments": "{}"}}

    def rendered(results: list[tuple[str, str]], parser: str | None = "harmony") -> str:
        said = {
            "role": "assistant",
            "reasoning": "Both.",
            "tool_calls": [call("a", "f"), call("b", "g")],
        }
        answers = [{"role": "tool", "tool_call_id": i, "content": c} for i, c in results]
        messages = [
            {"role": "user", "content": "Hi"},
            said,
            *answers,
            {"role": "user", "content": "Go"},
        ]
        body = ChatCompletionRequest.model_validate({"model": "m", "messages": messages})
        return jinja2.Template(FIRST_CALL_ONLY).render(messages=chat_messages(body, parser))

    # In either order, by id; the reasoning once, before the first call.
    for results in ([("a", "1"), ("b", "2")], [("b", "2"), ("a", "1")]):
        assert rendered(results) == "[user: Hi][Both. call f {}][f: 1][call g {}][g: 2][user: Go]"
    # Ids that match no call: by place; a result more than the calls stays after them.
    assert rendered([("x", "1"), ("y", "2"), ("z", "3")]) == (
        "[user: Hi][Both. call f {}][f: 1][call g {}][g: 2][g: 3][user: Go]"
    )
    # A call not answered (yet) is in the prompt all the same.
    assert rendered([("b", "2")]) == "[user: Hi][Both. call f {}][call g {}][g: 2][user: Go]"
    # Llama 3's template refuses a message of several calls: it gets one call a message too.
    assert rendered([("a", "1"), ("b", "2")], "llama3") == (
        "[user: Hi][call f {}][f: 1][call g {}][g: 2][user: Go]"
    )
    # Other templates write every call of a message: theirs stay as they were sent.
    assert rendered([("a", "1"), ("b", "2")], None) == (
        "[user: Hi][call f {}][f: 1][f: 2][user: Go]"
    )
