"""Anthropic's Messages API through a real daemon, with the real `anthropic` SDK: what Claude Code
and the SDKs send LM Studio's /v1/messages."""

from __future__ import annotations

import json
from typing import Any

import anthropic
import pytest

from tests.conftest import Daemon

WEATHER: Any = {
    "name": "get_weather",
    "description": "Weather in a city",
    "input_schema": {
        "type": "object",
        "properties": {"city": {"type": "string", "enum": ["Paris", "Oslo"]}},
        "required": ["city"],
        "additionalProperties": False,
    },
}
ASK: Any = [{"role": "user", "content": "What's the weather in Paris?"}]
# The SDK has no temperature (Claude's newest models take none); older clients send it.
GREEDY: Any = {"model": "lmx-tiny", "messages": ASK, "extra_body": {"temperature": 0}}


@pytest.fixture(scope="module")
def client(daemon: Daemon) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=daemon.url, api_key="unused", max_retries=0, timeout=60)


def text_of(message: anthropic.types.Message) -> str:
    return "".join(b.text for b in message.content if b.type == "text")


def answer(client: anthropic.Anthropic, kwargs: Any, stream: bool) -> anthropic.types.Message:
    """The message answering `kwargs`, streamed or not."""
    if not stream:
        return client.messages.create(**kwargs)
    with client.messages.stream(**kwargs) as s:
        return s.get_final_message()


def test_a_message_streamed_or_not_is_the_same_answer(client: anthropic.Anthropic) -> None:
    whole = client.messages.create(**GREEDY, max_tokens=12)
    assert whole.stop_reason in ("max_tokens", "end_turn") and whole.role == "assistant"
    assert whole.usage.output_tokens <= 12 and whole.usage.input_tokens > 0
    with client.messages.stream(**GREEDY, max_tokens=12) as stream:
        streamed = stream.get_final_message()
        assert stream.current_message_snapshot.id == streamed.id
    assert [b.type for b in streamed.content] == [b.type for b in whole.content]
    assert text_of(streamed) == text_of(whole)
    assert streamed.usage.output_tokens == whole.usage.output_tokens


@pytest.mark.parametrize("stream", [False, True])
def test_a_forced_tool_use_parses_and_validates(client: anthropic.Anthropic, stream: bool) -> None:
    kwargs: Any = {
        "model": "lmx-tiny",
        "messages": ASK,
        "max_tokens": 300,
        "tools": [WEATHER],
        "tool_choice": {"type": "tool", "name": "get_weather"},
    }
    message = answer(client, kwargs, stream)
    assert message.stop_reason == "tool_use"
    calls = [b for b in message.content if b.type == "tool_use"]
    assert calls and all(c.name == "get_weather" for c in calls)
    assert all(c.input in ({"city": "Paris"}, {"city": "Oslo"}) for c in calls)
    # The answer goes back with its result, as a client's next turn does.
    results: Any = [
        {"type": "tool_result", "tool_use_id": c.id, "content": "12 C, rain"} for c in calls
    ]
    turn = [
        *ASK,
        {"role": "assistant", "content": message.content},
        {"role": "user", "content": results},
    ]
    after = client.messages.create(model="lmx-tiny", messages=turn, max_tokens=4, tools=[WEATHER])
    assert after.stop_reason in ("max_tokens", "end_turn", "tool_use")


def test_a_stop_sequence_ends_the_message_and_is_named(client: anthropic.Anthropic) -> None:
    reference = text_of(client.messages.create(**GREEDY, max_tokens=24))
    # The first three characters after the start that come up there first: the text before
    # them is what a stop at them leaves.
    at = next(i for i in range(1, len(reference) - 2) if reference.find(reference[i : i + 3]) == i)
    stop = reference[at : at + 3]
    message = client.messages.create(**GREEDY, max_tokens=24, stop_sequences=["\x00", stop])
    assert (message.stop_reason, message.stop_sequence) == ("stop_sequence", stop)
    assert text_of(message) == reference[: reference.index(stop)]


@pytest.mark.parametrize("stream", [False, True])
def test_a_json_output_format_validates(client: anthropic.Anthropic, stream: bool) -> None:
    schema = {
        "type": "object",
        "properties": {"name": {"type": "string", "maxLength": 12}, "mood": {"enum": ["a", "b"]}},
        "required": ["name", "mood"],
        "additionalProperties": False,
    }
    kwargs: Any = {
        "model": "lmx-tiny",
        "messages": [{"role": "user", "content": "Describe someone."}],
        "max_tokens": 200,
        "output_config": {"format": {"type": "json_schema", "schema": schema}},
    }
    message = answer(client, kwargs, stream)
    assert message.stop_reason == "end_turn"
    person = json.loads(text_of(message))
    assert set(person) == {"name", "mood"} and len(person["name"]) <= 12
    assert person["mood"] in ("a", "b")


def test_count_tokens_matches_the_messages_input_tokens(client: anthropic.Anthropic) -> None:
    counted = client.messages.count_tokens(model="lmx-tiny", messages=ASK, tools=[WEATHER])
    message = client.messages.create(model="lmx-tiny", messages=ASK, tools=[WEATHER], max_tokens=1)
    # Anthropic's input_tokens leave out those read from the cache: an earlier test's prompt.
    usage = message.usage
    assert counted.input_tokens == usage.input_tokens + (usage.cache_read_input_tokens or 0) > 0
